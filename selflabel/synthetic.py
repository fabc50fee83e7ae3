"""Network-like score matrices for demos, benchmarks and tests.

Samples are drawn around ``n_classes`` latent class centres in a D-dimensional
feature space; the K cluster prototypes are random unit vectors, and scores are
scaled cosine similarities, as a linear head on normalised features produces.
``dead`` prototypes are pushed away from all data (clusters nobody prefers),
the situation that breaks float32 scaling-form Sinkhorn at large lamb.
"""

from __future__ import annotations

import torch


def make_scores(
    n: int,
    k: int,
    *,
    kind: str = "logits",
    n_classes: int | None = None,
    dim: int = 32,
    temperature: float = 10.0,
    noise: float = 0.6,
    dead: int = 0,
    dead_margin: float = 3.0,
    heads: int | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    chunk: int = 65536,
) -> torch.Tensor:
    """Return (n, k) scores, or (heads, n, k) when ``heads`` is given.

    Args:
        kind: "logits", "log_probs" (log-softmax) or "probs" (softmax).
        n_classes: latent classes (default k // 2, at least 2).
        temperature: logit scale (cosine similarity times this).
        noise: within-class spread relative to the distance between centres.
        dead: number of clusters whose logits are lowered by ``dead_margin * temperature``.
        chunk: rows generated at a time (bounds temporary memory).
    """
    if kind not in ("logits", "log_probs", "probs"):
        raise ValueError(f"kind must be 'logits', 'log_probs' or 'probs', got {kind!r}")
    if n < 1 or k < 1:
        raise ValueError(f"n and k must be positive, got n={n}, k={k}")
    if not 0 <= dead < k:
        raise ValueError(f"dead must be in [0, k), got {dead}")
    gen = torch.Generator().manual_seed(seed)
    n_classes = max(2, k // 2) if n_classes is None else n_classes
    h = 1 if heads is None else heads
    out = torch.empty(h, n, k, dtype=dtype)
    centres = torch.nn.functional.normalize(torch.randn(n_classes, dim, generator=gen), dim=1)
    classes = torch.randint(0, n_classes, (n,), generator=gen)
    for head in range(h):
        protos = torch.nn.functional.normalize(torch.randn(k, dim, generator=gen), dim=1)
        offset = torch.zeros(k)
        offset[k - dead:] = -dead_margin * temperature
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            x = centres[classes[start:stop]] + noise * torch.randn(stop - start, dim, generator=gen) / dim**0.5
            logits = temperature * torch.nn.functional.normalize(x, dim=1) @ protos.T + offset
            if kind == "log_probs":
                logits = torch.log_softmax(logits, dim=1)
            elif kind == "probs":
                logits = torch.softmax(logits.double(), dim=1)
            out[head, start:stop] = logits.to(dtype)
    return out[0] if heads is None else out

