"""Launch helpers shared by the Triton kernels."""

from __future__ import annotations

import os

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def configs(space: list[dict], interp: dict, warps: tuple[int, ...] = (4, 8)) -> list[triton.Config]:
    """Autotune configs; under the CPU interpreter a single small config (autotuning
    there would only multiply the run time)."""
    if INTERPRET:
        return [triton.Config(interp, num_warps=1)]
    return [triton.Config(c, num_warps=w) for c in space for w in warps]


def max_programs(device: torch.device) -> int:
    """Persistent-grid size: a few programs per SM, each owning one column partial."""
    if device.type != "cuda":
        return 4
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count
