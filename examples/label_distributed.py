"""Label a score matrix sharded over ranks: run with

    torchrun --nproc_per_node=2 examples/label_distributed.py --samples 100000 --clusters 500

Each rank builds (or would load) its own rows; the solver all-reduces the K-long
column sums once per iteration. Rank 0 prints a summary.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

import selflabel as sl
from selflabel.synthetic import make_scores


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=20_000, help="total rows over all ranks")
    parser.add_argument("--clusters", type=int, default=100)
    parser.add_argument("--lamb", type=float, default=25.0)
    args = parser.parse_args()
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        torch.cuda.set_device(rank % torch.cuda.device_count())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # this rank's rows of one global matrix (uneven split: the last rank takes the rest)
    per = args.samples // world
    lo, hi = rank * per, (args.samples if rank == world - 1 else (rank + 1) * per)
    scores = make_scores(args.samples, args.clusters, kind="probs", seed=0)[lo:hi].to(device)
    res = sl.sinkhorn_knopp(scores, kind="probs", lamb=args.lamb, process_group=dist.group.WORLD,
                            gather_labels=True)
    if rank == 0:
        sizes = torch.bincount(res.labels.cpu(), minlength=args.clusters)
        print(f"{world} ranks, {args.samples} rows: {res.n_iter} iterations, error {res.error:.2e}, "
              f"converged={res.converged}, cluster sizes {int(sizes.min())}..{int(sizes.max())}, "
              f"{res.seconds:.2f}s")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
