"""Distributed solve over spawned gloo process groups equals the single-process solve."""

import multiprocessing as mp
import queue as queue_mod
import socket

import numpy as np
import pytest
import torch
from dist_worker import LAMB, K, N, offsets, run

import selflabel as sl
from selflabel.synthetic import make_scores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(shards: list[int], timeout: float = 240.0) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=run, args=(r, len(shards), port, shards, q)) for r in range(len(shards))]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in procs:
            rank, out = q.get(timeout=timeout)
            results[rank] = out
    except queue_mod.Empty:
        pytest.fail(f"distributed workers timed out; got ranks {sorted(results)}")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    for rank, out in results.items():
        assert "crash" not in out, f"rank {rank} crashed:\n{out['crash']}"
    return results


def _check_duals(dist_out: dict, single, rows: slice) -> None:
    shift = np.mean(dist_out["log_v"] - single.log_v.numpy(), axis=-1, keepdims=True)
    assert np.allclose(dist_out["log_v"] - shift, single.log_v.numpy(), atol=1e-8)
    assert np.allclose(dist_out["log_u"] + shift, single.log_u.numpy()[..., rows], atol=1e-8)


@pytest.mark.parametrize("shards", [[150, 151], [100, 150, 51]], ids=["2-ranks", "3-ranks-unequal"])
def test_distributed_equals_single_process(shards):
    results = _spawn(shards)
    full = make_scores(N, K, temperature=3.0, dead=1, dead_margin=0.5, dtype=torch.float64, seed=1)
    heads = make_scores(N, K, temperature=3.0, heads=2, dtype=torch.float64, seed=2)
    off = offsets(shards)
    for algorithm in ("scaling", "log"):
        single = sl.sinkhorn_knopp(full, lamb=LAMB, algorithm=algorithm, tol=1e-10, max_iter=50_000)
        for rank, out in results.items():
            got = out[algorithm]
            assert got["converged"] and got["n_iter"] == single.n_iter
            assert np.array_equal(got["labels"], single.labels.numpy())  # gathered: all rows on every rank
            _check_duals(got, single, slice(off[rank], off[rank + 1]))
            # plain Sinkhorn-Knopp over the ranks: the same fixed point, in more iterations
            plain = out[f"{algorithm}_plain"]
            assert plain["converged"] and plain["n_iter"] > got["n_iter"]
            assert np.array_equal(plain["labels"], single.labels.numpy()[off[rank]:off[rank + 1]])
            _check_duals(plain, single, slice(off[rank], off[rank + 1]))
    single_heads = sl.sinkhorn_knopp(heads, lamb=LAMB, tol=1e-10, max_iter=50_000)
    weights = np.linspace(1.0, 2.0, N)
    single_w = sl.sinkhorn_knopp(full, lamb=LAMB, row_marginal=weights / weights.sum(), tol=1e-10, max_iter=50_000)
    for rank, out in results.items():
        rows = slice(off[rank], off[rank + 1])
        assert out["heads"]["labels"].shape == (2, shards[rank])
        assert np.array_equal(out["heads"]["labels"], single_heads.labels.numpy()[:, rows])
        _check_duals(out["heads"], single_heads, rows)
        assert np.array_equal(out["weighted"]["labels"], single_w.labels.numpy()[rows])
        _check_duals(out["weighted"], single_w, rows)
        assert out["after_errors"]["converged"]


def test_bad_input_on_one_rank_raises_on_every_rank():
    results = _spawn([150, 151])
    assert "NaN or +inf" in results[1]["nan"]
    assert "another rank's input is invalid" in results[0]["nan"]
    for out in results.values():
        assert "ranks disagree on K" in out["mismatched_k"]
        assert "row_marginal must be given on every rank" in out["one_sided_marginal"]


def test_every_disagreement_raises_on_every_rank_and_failures_mid_solve_reach_all():
    """Ranks whose options differ raise a ValueError naming the option, on every rank (no gloo abort,
    no hang); an exception in one rank's pass mid-solve raises on every rank within seconds."""
    from dist_worker import MISMATCHES

    results = _spawn([150, 151])
    for rank, out in results.items():
        for name in MISMATCHES:
            assert out[f"mismatch_{name}"].startswith("RankInputError") and name in out[f"mismatch_{name}"], (
                rank, name, out[f"mismatch_{name}"])
        for algorithm in ("scaling", "log"):
            got = out[f"midsolve_{algorithm}"]
            want = "InjectedFailure: disk error on pass 8" if rank == 1 else "RankFailedError"
            assert got.startswith(want), (rank, algorithm, got)
            assert out[f"midsolve_{algorithm}_seconds"] < 30
        assert out["after_errors"]["converged"]


def test_process_group_without_init_is_a_clear_error():
    with pytest.raises(ValueError, match="not initialised"):
        sl.sinkhorn_knopp(torch.randn(10, 3), process_group=object())


def test_torchrun_example(tmp_path):
    import os
    import subprocess
    import sys

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                str(_free_port())]
    script = os.path.join(os.path.dirname(__file__), "..", "examples", "label_distributed.py")
    proc = subprocess.run([*torchrun, script, "--samples", "2000", "--clusters", "20"], capture_output=True, text=True,
                          timeout=240, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 ranks, 2000 rows" in proc.stdout and "converged=True" in proc.stdout
    single = sl.sinkhorn_knopp(make_scores(2000, 20, kind="probs", seed=0), kind="probs")
    assert f"{single.n_iter} iterations" in proc.stdout


# `python -m selflabel` (cli.main), then print the gloo threads still alive: destroy_process_group
# must have joined them, else a gloo worker still releasing the last collective's tensors takes the
# GIL while the interpreter finalises and the rank aborts ("terminate called without an active
# exception"), at random
_CLI_THEN_THREADS = """
import os, sys
from selflabel.cli import main
rc = main(sys.argv[1:])
names = []
for tid in os.listdir("/proc/self/task"):
    try:
        with open(f"/proc/self/task/{tid}/comm") as fh:
            names.append(fh.read().strip())
    except OSError:
        pass
print(f"rank {os.environ['RANK']}: gloo threads after main: {sorted(n for n in names if 'gloo' in n)}", flush=True)
sys.exit(rc)
"""


def test_torchrun_training_loop(tmp_path):
    """SeLa's training loop under torchrun with 2 gloo ranks: DDP steps, distributed label updates."""
    import os
    import subprocess
    import sys

    if not os.path.isdir("/proc/self/task"):
        pytest.skip("needs /proc to list the threads left after teardown")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                str(_free_port())]
    out = tmp_path / "run"
    script = tmp_path / "cli_then_threads.py"
    script.write_text(_CLI_THEN_THREADS)
    args = [str(script), "train", "--arch", "mlp", "--epochs", "3", "--nopts", "3", "--batch-size", "64",
            "--out", str(out), "--no-tensorboard", "--quiet", "--device", "cpu"]
    proc = subprocess.run([*torchrun, *args], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "terminate called" not in proc.stderr, proc.stderr[-3000:]
    for rank in (0, 1):  # destroy_process_group joined gloo's threads on both ranks
        assert f"rank {rank}: gloo threads after main: []" in proc.stdout, proc.stdout
    lines = [ln for ln in proc.stdout.splitlines() if "NMI" in ln]
    assert len(lines) == 1, proc.stdout  # rank 0 reports once
    nmi = float(lines[0].split("NMI ")[1].split()[0])
    assert nmi > 0.2
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    labels = ckpt["labels"]  # the last training labels: 3 heads, 2 views of each image
    assert labels.shape == (3, 2, 1797) and ckpt["epoch"] == 3
    sizes = torch.bincount(labels[0].flatten(), minlength=10)
    assert sizes.min() >= 0.9 * 359.4 and sizes.max() <= 1.1 * 359.4  # balanced over both ranks' rows
