"""Triton GPU kernels (installed as ``selflabel.kernels``), one job per file:

- ``prepare``: scores -> kernel matrix (exp-prob), row max, column max, validation stats
- ``scaling``: one fused scaling-form iteration (one read of M)
- ``logdomain``: one fused log-domain iteration (stable for any lamb in float32)
- ``labels``: hard labels from the kernel matrix and the column potentials
- ``implicit``: one fused log-domain iteration on scores recomputed from features (tl.dot)

Each file carries ``torch_reference`` (the plain-torch computation it must match), its GPU
autotune space (``GPU_CONFIGS``, pruned of configs that spill) and launchers that check the
tensors they are given (``_common.check_tensors``). Under ``TRITON_INTERPRET=1`` they run on
CPU tensors (slowly), which is how CI tests them; ``benchmarks/kernel_resources.py`` compiles
them for sm_80 and sm_90a without a GPU (registers, spills, shared memory, global loads).
"""
