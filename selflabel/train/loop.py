"""The thin training loop: SeLa (self-labelling with our Sinkhorn solver) and CARP.

One function, ``train(config)``: it resolves the options and runs a ``_Run`` (build in its
constructor, ``epoch`` per epoch, ``finish`` at the end; SeLa's loss is ``sela.swapped_cross_entropy``,
CARP's step ``carp.CarpStep``). In order:

1. data, network (and CARP's EMA teacher), SGD; resume from ``OUT/checkpoint.pt`` if asked;
2. per step: SeLa relabels the whole dataset at the quadratically spaced steps
   (``label_schedule``), one balanced solve over ``views`` fresh augmented views of every image,
   and trains each view with cross-entropy on another view's label (``sela.swapped_cross_entropy``),
   averaged over heads;
   CARP's step (``carp.CarpStep``) trains its views on random prototype blocks (``carp.carp_loss``)
   and moves the EMA teacher;
3. per epoch: an atomic checkpoint (weights, optimiser, labels, RNG state) and TensorBoard scalars;
4. at the end: labels from the final network, scored against the true classes with NMI, ARI
   and Hungarian accuracy, kNN and linear-probe accuracy, beside k-means on raw pixels.

Under ``torchrun`` every rank trains on its own shard (DistributedDataParallel, gloo or
NCCL); the label update solves the whole dataset at once with ``process_group``, each rank
passing its shard's scores and one all_reduce of the column sums per solver iteration.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from ..io import atomic_write, save_json
from ..solver import sinkhorn_knopp, sinkhorn_knopp_features
from ..source import parse_bytes
from ..store import ScoreStore
from .carp import CarpStep
from .data import ImageSet, ViewDataset, Views, load_image_set, split_images
from .evaluate import cluster_scores, heldout_scores, kmeans_features, kmeans_scores, probe_scores
from .models import CarpHead, Network, SelaHeads, build_backbone
from .sela import swapped_cross_entropy
from .threads import StepThreads

METHODS = ("sela", "carp")


@dataclass
class TrainConfig:
    """Options of ``selflabel train`` (None = a default chosen for the dataset and method)."""

    method: str = "sela"
    data: str = "digits"
    arch: str | None = None
    ncl: int | None = None  # clusters K (default: the number of classes)
    hc: int | None = None  # SeLa heads
    views: int | None = None  # SeLa: augmented views per image, labelled together, each trained on another's label
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    lrdrop: int | None = None  # divide lr by 10 every lrdrop epochs
    wd: float | None = None
    nopts: int | None = None  # SeLa label updates over the run (quadratic spacing)
    lamb: float | None = None
    dtype: str = "f64"
    augs: int | None = None  # 0 none, 1 light, 2 strong
    out: str = "selflabel-run"
    resume: bool = False
    seed: int = 0
    device: str = "auto"  # auto: cuda (this rank's GPU under torchrun) when available, else cpu
    workers: int = 0
    threads: int = 0  # torch threads of the steps; 0: all or one, whichever the steps measure faster
    implicit: bool = False  # SeLa: label from features x head weights, never storing N x K scores
    memory_budget: str | None = None  # SeLa: aggregate scores on disk and stream them within this budget
    carp_block: int | None = None  # CARP: prototypes per random block (NB)
    carp_blocks: int | None = None  # CARP: random blocks per step (NP; default ncl // carp_block, all prototypes)
    holdout: float = 0.0  # fraction of the images kept out of training, to score the learned clusters on
    carp_local: int | None = None  # CARP: local views besides the two global ones
    carp_momentum: float | None = None  # CARP: EMA teacher momentum at the start (cosine to 1)
    stop_after: int | None = None  # stop after this epoch (split a run; --resume continues it)
    progress: bool = True
    tensorboard: bool = True
    evaluate: bool = True


# dataset-aware defaults: digits is the CPU demo (tuned on it over seeds 0-2: mlp, small batches,
# sharper SeLa labels and more weight decay; CARP with one block of all 10 prototypes, no local
# crops of the small images and a faster teacher); mnist5k keeps those choices with the mlp, which
# beat the conv nets per second of CPU (README, "Learning quality"); the others follow SeLa's and
# CARP's recipes
_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": dict(arch="mlp", epochs=40, batch_size=32, lr=0.02, lrdrop=30, nopts=40, hc=3, augs=2),
    "mnist5k": dict(arch="mlp", epochs=40, batch_size=64, lr=0.02, lrdrop=30, nopts=60, hc=3, augs=2),
    "small": dict(arch="resnet18", epochs=200, batch_size=256, lr=0.05, lrdrop=150, nopts=100, hc=1, augs=1),
    "imagefolder": dict(arch="alexnet_big", epochs=400, batch_size=256, lr=0.05, lrdrop=150, nopts=160, hc=10,
                        augs=1),
}
_METHOD_DEFAULTS = {"sela": dict(lamb=25.0, wd=1e-5, views=2),
                    "carp": dict(lamb=1.0, carp_local=2, hc=1, wd=1e-5, carp_momentum=0.99)}
_DIGITS_SELA, _DIGITS_CARP = dict(lamb=50.0, wd=1e-4), dict(carp_local=0, carp_momentum=0.9)
# (dataset, method) on top of both tables above; CARP on digits over seeds 0-2: NMI 0.888 at 60 epochs, 0.873 at 40
_SET_METHOD = {("digits", "sela"): _DIGITS_SELA, ("digits", "carp"): {**_DIGITS_CARP, "epochs": 60, "lrdrop": 45},
               ("mnist5k", "sela"): _DIGITS_SELA, ("mnist5k", "carp"): _DIGITS_CARP}
_DIGIT_SETS = ("digits", "mnist5k")  # the small grey digit sets: CARP's default there is one block of all K


def _resolve(cfg: TrainConfig, images: ImageSet) -> TrainConfig:
    if cfg.method not in METHODS:
        raise ValueError(f"--method must be one of {METHODS}, got {cfg.method!r}")
    if cfg.dtype not in ("f32", "f64"):
        raise ValueError(f"--dtype must be f32 or f64, got {cfg.dtype!r}")
    group = images.name if images.name in _DEFAULTS else "small"
    defaults = {**_DEFAULTS[group], **_METHOD_DEFAULTS[cfg.method], **_SET_METHOD.get((group, cfg.method), {}),
                "ncl": images.num_classes}
    cfg = replace(cfg, **{k: v for k, v in defaults.items() if getattr(cfg, k) is None})
    if cfg.carp_block is None:  # digits: one block of all K prototypes (two random blocks of 5 did worse)
        block = cfg.ncl if group in _DIGIT_SETS else max(2, cfg.ncl // 2) if cfg.ncl < 64 else min(512, cfg.ncl // 4)
        cfg = replace(cfg, carp_block=block)
    if cfg.augs not in (0, 1, 2):
        raise ValueError(f"--augs must be 0 (none), 1 (light) or 2 (strong), got {cfg.augs}")
    for name in ("ncl", "hc", "epochs", "batch_size", "lrdrop", "nopts") + (("views",) if cfg.method == "sela" else ()):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.ncl < 2:
        raise ValueError(f"--ncl must be at least 2, got {cfg.ncl}")
    if cfg.method == "carp" and cfg.hc != 1:
        raise ValueError("--hc applies to SeLa; CARP has one prototype head")
    if cfg.method == "carp" and cfg.views is not None:
        raise ValueError("--views applies to SeLa; CARP has two global views and --carp-local local ones")
    if cfg.method == "sela" and cfg.carp_blocks is not None:
        raise ValueError("--carp-blocks applies to CARP; SeLa has no prototype blocks")
    if cfg.implicit and cfg.memory_budget:
        raise ValueError("--implicit never stores scores; --memory-budget is for stored scores: pick one")
    _check_numbers(cfg)
    if cfg.memory_budget is not None:
        try:
            parse_bytes(cfg.memory_budget)
        except ValueError as exc:
            raise ValueError(f"--memory-budget: {exc}") from None
    _device(cfg.device)
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise ValueError(f"--out {cfg.out} is a file; train writes a folder (checkpoint.pt, metrics.json, "
                         "tensorboard/): name a folder, new or existing")
    return cfg


def _check_numbers(cfg: TrainConfig) -> None:
    """Every numeric option in its range, the error naming the flag."""
    finite = math.isfinite
    rules: list[tuple[str, bool, str]] = [
        ("lr", finite(cfg.lr) and cfg.lr > 0, "a finite number > 0"),
        ("wd", finite(cfg.wd) and cfg.wd >= 0, "a finite number >= 0"),
        ("lamb", finite(cfg.lamb) and cfg.lamb > 0, "a finite number > 0"),
        ("carp_block", 2 <= cfg.carp_block <= cfg.ncl,
         f"in [2, ncl={cfg.ncl}] (a softmax over one prototype is constant)"),
        ("carp_blocks", cfg.carp_blocks is None or 1 <= cfg.carp_blocks <= cfg.ncl // max(cfg.carp_block, 1),
         f"in [1, ncl // carp_block = {cfg.ncl // max(cfg.carp_block, 1)}] (blocks of distinct prototypes)"),
        ("holdout", finite(cfg.holdout) and 0 <= cfg.holdout <= 0.5, "in [0, 0.5] (a fraction of the images)"),
        ("carp_local", cfg.carp_local is None or cfg.carp_local >= 0, "at least 0"),
        ("carp_momentum", cfg.carp_momentum is None or (finite(cfg.carp_momentum) and 0 <= cfg.carp_momentum < 1),
         "in [0, 1)"),
        ("stop_after", cfg.stop_after is None or cfg.stop_after >= 1, "at least 1 (an epoch number)"),
        ("workers", cfg.workers >= 0, "at least 0"),
        ("threads", cfg.threads >= 0, "at least 0 (0: chosen by measurement)"),
        ("seed", 0 <= cfg.seed < 2**32, "in [0, 2**32)"),
    ]
    for name, ok, want in rules:
        if not ok:
            raise ValueError(f"--{name.replace('_', '-')} must be {want}, got {getattr(cfg, name)}")


def _device(spec: str) -> torch.device:
    """``--device``: auto (this rank's GPU under torchrun when there is one, else CPU), cpu, cuda, cuda:N."""
    if spec == "auto":
        local = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {spec!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {spec}: no CUDA GPU is available here; use --device cpu (or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {spec}: this machine has {torch.cuda.device_count()} GPU(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def label_schedule(total_steps: int, nopts: int) -> list[int]:
    """SeLa's label-update steps: ``nopts`` of them, quadratically spaced (dense early), the first at 0."""
    t = (np.arange(nopts) / nopts) ** 2 * total_steps
    return sorted({int(s) for s in t})


def _views(cfg: TrainConfig, images: ImageSet, n_global: int | None = None) -> Views:
    """The training views: SeLa's ``cfg.views``, CARP's two global views and ``cfg.carp_local`` local ones
    (``n_global`` overrides the count, local views dropped: the views a relabelling draws one at a time)."""
    strength = {0: dict(rotate=0.0, translate=0.0, global_scale=(1.0, 1.0)),
                1: dict(rotate=10.0, translate=0.1, global_scale=(0.8, 1.0)),
                2: dict(rotate=20.0, translate=0.15, global_scale=(0.6, 1.0))}[cfg.augs]
    if n_global is not None:
        n_local = 0
    elif cfg.method == "sela":
        n_global, n_local = cfg.views, 0
    else:
        n_global, n_local = 2, cfg.carp_local
    return Views(n_global=n_global, n_local=n_local, flip=images.name not in ("digits", "mnist5k", "svhn"),
                 **strength)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def _aggregate(net: Network, images: ImageSet, idx: np.ndarray, batch_size: int, *, scores: bool,
               store: ScoreStore | None = None, embed: bool = False,
               views: list[ViewDataset] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Features (n, D) of the samples ``idx`` (with ``embed``, the head's embeddings ``head.embed(features)``)
    and, with ``scores``, head log-softmax (H, n, K) (or into ``store``). With ``views`` (V one-view
    datasets), the rows are those of every view in turn: (V * n, D) and (H, V * n, K)."""
    was_training = net.training
    net.eval()
    sets = views or [ViewDataset(images, None, 0)]
    loaders = [torch.utils.data.DataLoader(s, batch_size=batch_size, sampler=idx.tolist(), num_workers=0) for s in sets]
    feats, outs = [], []
    device = next(net.parameters()).device
    for x in (x if views is None else x[0] for loader in loaders for _, x in loader):
        f = net.features(x.to(device, non_blocking=True))
        feats.append(net.head.embed(f) if embed else f)
        if scores:
            s = F.log_softmax(net.head(f).float(), dim=-1)
            s = s if s.dim() == 3 else s[None]
            if store is not None:
                store.append(s)
            else:
                outs.append(s)
    net.train(was_training)
    return torch.cat(feats), (torch.cat(outs, dim=1) if outs else None)


def _check_finite(net: Network, step: int) -> None:
    """A diverged network (a finite loss, then an infinite update) would give the solver NaN scores."""
    for name, t in [*net.named_parameters(), *net.named_buffers()]:
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise FloatingPointError(f"the network's {name} is not finite at step {step}; lower --lr or check the data")


def _relabel(net: Network, images: ImageSet, cfg: TrainConfig, shard: np.ndarray, world: int, init: Any,
             views: list[ViewDataset] | None = None):
    """Solve SeLa's labelling for the whole dataset, one row per sample and view (the unaugmented image when
    ``views`` is None); returns (labels (H, V, N) in dataset order, result)."""
    options = dict(lamb=cfg.lamb, dtype=torch.float64 if cfg.dtype == "f64" else torch.float32, init=init)
    if world > 1:
        options.update(process_group=dist.group.WORLD, gather_labels=True)
    n_views = len(views) if views else 1
    if cfg.implicit:
        # logits = embed(features) @ W.T + b: SeLa's features x head weights, CARP's projections x prototypes / T
        emb, _ = _aggregate(net, images, shard, 4 * cfg.batch_size, scores=False, embed=True, views=views)
        w, b = net.head.score_weights()  # CUDA: fused tl.dot kernel; CPU: chunked BLAS blocks
        res = sinkhorn_knopp_features(emb, w, b, **options)
    elif cfg.memory_budget:
        path = os.path.join(cfg.out, f"scores-rank{dist.get_rank() if world > 1 else 0}.npy")
        with ScoreStore(path, n=n_views * len(shard), k=cfg.ncl, heads=cfg.hc, dtype=np.float32) as store:
            _aggregate(net, images, shard, 4 * cfg.batch_size, scores=True, store=store, views=views)
        res = sinkhorn_knopp(path, kind="log_probs", backend="chunked", memory_budget=cfg.memory_budget, **options)
    else:
        _, scores = _aggregate(net, images, shard, 4 * cfg.batch_size, scores=True, views=views)
        res = sinkhorn_knopp(scores, kind="log_probs", **options)
    return _dataset_order(res.labels.reshape(-1, res.labels.shape[-1]).cpu(), len(images), world, n_views), res


def _dataset_order(labels: torch.Tensor, n: int, world: int, n_views: int) -> torch.Tensor:
    """Gathered labels (H, rows) -> (H, V, N) in dataset order. The rows come rank by rank, rank r holding
    the samples r, r + world, ... (its shard), each shard's rows view by view."""
    rows = [(v, np.arange(r, n, world)) for r in range(world) for v in range(n_views)]
    view_of = torch.from_numpy(np.concatenate([np.full(len(i), v) for v, i in rows]))
    sample_of = torch.from_numpy(np.concatenate([i for _, i in rows]))
    out = torch.empty(labels.shape[0], n_views, n, dtype=labels.dtype)
    out[:, view_of, sample_of] = labels
    return out


def _relabel_views(cfg: TrainConfig, images: ImageSet, step: int) -> list[ViewDataset] | None:
    """SeLa's ``cfg.views`` > 1: the augmented views one relabelling labels, drawn afresh at each ``step``."""
    if cfg.views == 1:
        return None
    one = _views(cfg, images, n_global=1)
    sets = [ViewDataset(images, one, cfg.seed * 1_000_003 + 7919 * (v + 1)) for v in range(cfg.views)]
    for s in sets:
        s.set_epoch(step)
    return sets


def _label_stats(labels: torch.Tensor, k: int) -> dict[str, float]:
    sizes = torch.bincount(labels[0].flatten(), minlength=k).double()
    p = sizes / sizes.sum()
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
    return {"label_entropy": entropy, "cluster_min": float(sizes.min()), "cluster_max": float(sizes.max())}


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


# options that may differ on --resume: where and how the run executes, not what it computes
# (--implicit and --memory-budget change how the same labelling is stored, not its optimum);
# every other option (resolved defaults included) must match the checkpoint's
MAY_CHANGE_ON_RESUME = ("out", "resume", "device", "workers", "threads", "stop_after", "implicit", "memory_budget",
                        "progress", "tensorboard", "evaluate")
_CHECKPOINT_KEYS = ("net", "optimizer", "teacher", "labels", "log_v", "epoch", "step", "history", "rng", "config")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _load_checkpoint(path: str, cfg: TrainConfig) -> dict[str, Any]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"--resume: no checkpoint at {path}; run once without --resume first")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated zip, not a torch file, unpickling errors
        raise ValueError(f"--resume: {path} cannot be read ({type(exc).__name__}: {exc}); it is truncated or not a "
                         "selflabel checkpoint: restore it, or start again without --resume") from None
    missing = [k for k in _CHECKPOINT_KEYS if k not in ckpt] if isinstance(ckpt, dict) else list(_CHECKPOINT_KEYS)
    if missing:
        raise ValueError(f"--resume: {path} is not a selflabel checkpoint (missing {', '.join(missing)}); "
                         "start again without --resume")
    saved, now = ckpt["config"], asdict(cfg)
    # options newer than the checkpoint take the value its run had
    saved = {"views": 1 if saved.get("method") == "sela" else None, "holdout": 0.0, "carp_blocks": None, **saved}
    diff = [f"{_flag(k)}: checkpoint {saved[k]!r}, now {now[k]!r}" for k in now
            if k not in MAY_CHANGE_ON_RESUME and k in saved and saved[k] != now[k]]
    if diff:
        allowed = [_flag(k) for k in MAY_CHANGE_ON_RESUME if k not in ("resume", "progress", "tensorboard", "evaluate")]
        raise ValueError("--resume with options that differ from the checkpoint: " + "; ".join(diff)
                         + f". Give the checkpoint's values (only {', '.join(allowed)}, --quiet and --no-tensorboard "
                         "may change), or start again without --resume")
    return ckpt


def _evaluate(net: Network, images: ImageSet, cfg: TrainConfig, labels: torch.Tensor,
              held: ImageSet | None = None) -> dict[str, dict]:
    """Scores of the final labels, the network's argmax, k-means on its features and probes, against the
    classes; k-means on pixels as the baseline; with ``held``, how the clusters learned on the training
    images (argmax of the head, k-means centroids) assign the held-out ones."""
    feats, scores = _aggregate(net, images, np.arange(len(images)), 4 * cfg.batch_size, scores=True)
    feats, truth, argmax = feats.cpu().numpy(), images.targets, scores[0].argmax(-1).cpu().numpy()
    held_feats = held_argmax = None
    if held is not None:
        held_feats, held_scores = _aggregate(net, held, np.arange(len(held)), 4 * cfg.batch_size, scores=True)
        held_argmax = held_scores[0].argmax(-1).cpu().numpy()
        held_feats = held_feats.cpu().numpy()
    res: dict[str, dict] = {
        "labels": cluster_scores(truth, labels[0].numpy()),
        "argmax": cluster_scores(truth, argmax),
        "kmeans_features": kmeans_features(feats, truth, images.num_classes, seed=cfg.seed,
                                           held_feats=held_feats, held_truth=None if held is None else held.targets),
        "features": probe_scores(feats, truth, seed=cfg.seed)}
    if held is not None:
        res["argmax"]["heldout"] = heldout_scores(truth, argmax, held.targets, held_argmax, cfg.ncl)
    if images.pixels is not None or len(images) <= 20_000:
        pixels = images.pixels
        if pixels is None:
            pixels = torch.stack([images.get(i) for i in range(len(images))])
        res["kmeans_pixels"] = kmeans_scores(pixels.flatten(1).numpy(), truth, images.num_classes, seed=cfg.seed)
    return res


def _flat(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of the nested metrics as ``a/b_c`` scalars (library names and other text left out)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}_"))
        elif isinstance(value, (int, float)):
            out[prefix + key] = float(value)
    return out


def _summary(metrics: dict[str, dict]) -> str:
    lab, base, km = metrics["labels"], metrics.get("kmeans_pixels"), metrics["kmeans_features"]
    line = f"NMI {lab['nmi']:.3f} ARI {lab['ari']:.3f} acc {lab['acc']:.3f}"
    if lab["clusters"] > km["clusters"]:  # over-clustering: Hungarian accuracy leaves clusters unmatched
        line += f" many-to-one acc {lab['m2o_acc']:.3f} ({lab['clusters']} clusters)"
    line += f" | k-means on features ({km['library']}): NMI {km['nmi']:.3f} acc {km['acc']:.3f}"
    if "heldout" in km:
        proto = metrics["argmax"]["heldout"]
        line += (f" | held-out {km['heldout']['samples']}: k-means NMI {km['heldout']['nmi']:.3f}, head argmax "
                 f"NMI {proto['nmi']:.3f} many-to-one acc {proto['m2o_acc']:.3f}")
    if base:
        line += f" | k-means on pixels: NMI {base['nmi']:.3f} ARI {base['ari']:.3f} acc {base['acc']:.3f}"
    feats = metrics["features"]
    return line + f" | kNN acc {feats['knn_acc']:.3f} linear acc {feats['linear_acc']:.3f}"


@dataclass
class TrainResult:
    """What ``train`` returns: the final network, labels (H, N) and the evaluation (empty if skipped).

    The labels are those of the unaugmented images at the end of a run; a run stopped by ``stop_after``
    returns the last training labels of the first view."""

    net: Network
    labels: torch.Tensor
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    config: TrainConfig | None = None


def _build(cfg: TrainConfig, images: ImageSet, device: torch.device,
           total_steps: int) -> tuple[Network, CarpStep | None, torch.optim.Optimizer]:
    """The network (SeLa's heads or CARP's prototypes on the backbone), CARP's step with its teacher, SGD."""
    backbone = build_backbone(cfg.arch, images.channels, images.image_size)
    head = (SelaHeads(backbone.out_dim, cfg.ncl, cfg.hc) if cfg.method == "sela"
            else CarpHead(backbone.out_dim, cfg.ncl))
    net = Network(backbone, head).to(device)
    carp = (CarpStep(net, ncl=cfg.ncl, block=cfg.carp_block, n_blocks=cfg.carp_blocks, momentum=cfg.carp_momentum,
                     seed=cfg.seed, total_steps=total_steps) if cfg.method == "carp" else None)
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.wd)
    return net, carp, opt


class _Run:
    """One training run: what it is built from (network, CARP's step, SGD, the data shard, the
    TensorBoard writer) and what changes as it goes (labels, potentials, step, history). ``train``
    calls ``epoch`` for each epoch and ``finish`` at the end."""

    def __init__(self, cfg: TrainConfig, images: ImageSet, rank: int, world: int, device: torch.device) -> None:
        self.cfg, self.images, self.world, self.device, self.main = cfg, images, world, device, rank == 0
        self.shard = np.arange(rank, len(images), world)  # this rank's samples
        min_shard = len(images) // world
        self.steps_per_epoch = min_shard // cfg.batch_size  # the same on every rank (DDP steps together)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.net, self.carp, self.opt = _build(cfg, images, device, self.total_steps)
        if cfg.batch_size > min_shard:
            raise ValueError(f"--batch-size {cfg.batch_size} exceeds the {min_shard} samples of a rank's shard")
        self.relabel_at = set(label_schedule(self.total_steps, cfg.nopts)) if cfg.method == "sela" else set()
        self.labels = torch.randint(cfg.ncl, (cfg.hc, cfg.views or 1, len(images)),
                                    generator=torch.Generator().manual_seed(cfg.seed))
        self.log_v, self.start_epoch, self.step, self.history = None, 0, 0, []
        self.ckpt_path = os.path.join(cfg.out, "checkpoint.pt")
        if cfg.resume:
            self._resume()
        device_ids = [device.index] if device.type == "cuda" else None
        self.model = (torch.nn.parallel.DistributedDataParallel(self.net, device_ids=device_ids) if world > 1
                      else self.net)
        self.writer = None
        if self.main and cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(cfg.out, "tensorboard"), purge_step=self.step)
        self.train_set = ViewDataset(images, _views(cfg, images), cfg.seed)
        self.threads = StepThreads(cfg.threads, device)

    def _resume(self) -> None:
        ckpt = _load_checkpoint(self.ckpt_path, self.cfg)
        self.net.load_state_dict(ckpt["net"])
        self.opt.load_state_dict(ckpt["optimizer"])
        if self.carp is not None:
            self.carp.teacher.load_state_dict(ckpt["teacher"])
        labels = ckpt["labels"]
        self.labels = labels[:, None] if labels.dim() == 2 else labels  # (H, N) before SeLa had views
        self.log_v, self.start_epoch = ckpt["log_v"], ckpt["epoch"]
        self.step, self.history = ckpt["step"], ckpt["history"]
        _set_rng_state(ckpt["rng"])

    def save(self, epoch: int) -> None:
        """The checkpoint after ``epoch`` epochs, written atomically (``_resume`` reads it back)."""
        with atomic_write(self.ckpt_path) as fh:
            torch.save({"net": self.net.state_dict(), "optimizer": self.opt.state_dict(),
                        "teacher": self.carp.teacher.state_dict() if self.carp is not None else None,
                        "labels": self.labels, "log_v": self.log_v, "epoch": epoch, "step": self.step,
                        "history": self.history, "rng": _rng_state(), "config": asdict(self.cfg)}, fh)

    def log(self, scalars: dict[str, float]) -> None:
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, self.step)

    def relabel(self, views: list[ViewDataset] | None) -> None:
        """SeLa's label update over ``views`` (None: the unaugmented images)."""
        _check_finite(self.net, self.step)
        self.labels, res = _relabel(self.net, self.images, self.cfg, self.shard, self.world, self.log_v, views)
        self.log_v = res.log_v.cpu()
        stats = _label_stats(self.labels, self.cfg.ncl)
        self.log({"labels/solver_iterations": res.n_iter, "labels/solver_seconds": res.seconds,
                  **{f"labels/{k}": v for k, v in stats.items()}})
        if self.writer is not None:
            sizes = torch.bincount(self.labels[0].flatten(), minlength=self.cfg.ncl)
            self.writer.add_histogram("labels/cluster_sizes", sizes, self.step)

    def train_step(self, idx: torch.Tensor, views: list[torch.Tensor], epoch: int) -> tuple[float, dict]:
        """One SGD step (after SeLa's label update where one is due): the loss and its parts."""
        cfg = self.cfg
        if self.step in self.relabel_at:
            self.threads.best()
            self.relabel(_relabel_views(cfg, self.images, self.step))
        self.threads.begin()
        views = [v.to(self.device, non_blocking=True) for v in views]
        if self.carp is None:
            batch_labels = self.labels[:, :, idx].to(self.device)
            loss, parts = swapped_cross_entropy(self.model(torch.cat(views)), batch_labels), {}
        else:
            loss, parts = self.carp.loss(self.model, views, self.step)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {self.step} (epoch {epoch + 1}); "
                                     "lower --lr or check the data")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.carp is not None:
            self.carp.update(self.net, self.step)
        value = loss.item()
        self.threads.end()
        return value, parts

    def epoch(self, epoch: int) -> None:
        """One pass over the shard, then the epoch's record, checkpoint and progress line."""
        cfg = self.cfg
        lr = cfg.lr * 0.1 ** (epoch // cfg.lrdrop)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.train_set.set_epoch(epoch)
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + epoch)
        order = self.shard[torch.randperm(len(self.shard), generator=gen)]
        loader = torch.utils.data.DataLoader(self.train_set, batch_size=cfg.batch_size, sampler=order.tolist(),
                                             num_workers=cfg.workers, drop_last=True)
        bar = tqdm(total=self.steps_per_epoch, desc=f"{cfg.method} epoch {epoch + 1}/{cfg.epochs}",
                   disable=not (self.main and cfg.progress), leave=False)
        losses = []
        for b, (idx, views) in enumerate(loader):
            if b == self.steps_per_epoch:
                break
            loss, parts = self.train_step(idx, views, epoch)
            losses.append(loss)
            self.log({"train/loss": loss, "train/lr": lr, **parts})
            bar.update()
            bar.set_postfix(loss=f"{loss:.3f}")
            self.step += 1
        bar.close()
        record = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "lr": lr}
        if self.main and cfg.method == "sela":
            scores = cluster_scores(self.images.targets, self.labels[0, 0].numpy())
            record.update({f"label_{k}": v for k, v in scores.items()})
            self.log({"eval/label_nmi": record["label_nmi"]})
        self.history.append(record)
        if self.main:
            self.save(epoch + 1)
            if cfg.progress:
                print(f"epoch {epoch + 1}/{cfg.epochs}: loss {record['loss']:.4f} lr {lr:.4g}"
                      + (f" label NMI {record['label_nmi']:.3f}" if "label_nmi" in record else ""), flush=True)

    def finish(self, held: ImageSet | None, t0: float) -> dict:
        """Labels of the unaugmented images from the final network, then the evaluation (rank 0)."""
        cfg = self.cfg
        self.threads.best()
        if self.carp is not None:  # balanced labels from the prototype head, by the same solver
            _check_finite(self.net, self.step)
            self.labels, _ = _relabel(self.net, self.images, replace(cfg, hc=1), self.shard, self.world, None)
        else:
            self.relabel(None)
        self.labels = self.labels[:, 0]
        if not (cfg.evaluate and self.main):
            return {}
        # scikit-learn's BLAS and OpenMP pools do not follow torch's count: hold them to it
        with threadpool_limits(limits=torch.get_num_threads()):
            metrics = _evaluate(self.net, self.images, cfg, self.labels, held)
        save_json(os.path.join(cfg.out, "metrics.json"), {"config": asdict(cfg), "metrics": metrics,
                                                          "history": self.history})
        self.log({f"final/{k}": v for k, v in _flat(metrics).items()})
        print(f"{cfg.method} on {cfg.data} ({cfg.arch}, K={cfg.ncl}, {cfg.epochs} epochs, "
              f"{time.perf_counter() - t0:.0f}s): {_summary(metrics)}", flush=True)
        return metrics

    def close(self) -> None:
        self.threads.close()
        if self.writer is not None:
            self.writer.close()


def train(config: TrainConfig | None = None, **overrides: Any) -> TrainResult:
    """Train SeLa or CARP as configured; see ``TrainConfig`` and ``selflabel train --help``."""
    t0 = time.perf_counter()
    cfg = replace(config or TrainConfig(), **overrides)
    images = load_image_set(cfg.data)
    cfg = _resolve(cfg, images)
    images, held = split_images(images, cfg.holdout, cfg.seed) if cfg.holdout else (images, None)
    rank, world = _world()
    device = _device(cfg.device)
    os.makedirs(cfg.out, exist_ok=True)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    run = _Run(cfg, images, rank, world, device)
    metrics: dict[str, dict[str, float]] = {}
    try:
        last_epoch = min(cfg.epochs, cfg.stop_after) if cfg.stop_after else cfg.epochs
        for epoch in range(run.start_epoch, last_epoch):
            run.epoch(epoch)
        if last_epoch == cfg.epochs:
            metrics = run.finish(held, t0)
    finally:
        run.close()
    labels = run.labels[:, 0] if run.labels.dim() == 3 else run.labels  # stopped early: the first view's labels
    return TrainResult(net=run.net, labels=labels, metrics=metrics, history=run.history,
                       seconds=time.perf_counter() - t0, config=cfg)
