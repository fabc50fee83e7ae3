"""Triton GPU kernels (installed as ``selflabel.kernels``), one job per file:

- ``prepare``: scores -> kernel matrix (exp-prob), row max, column max, validation stats
- ``scaling``: one fused scaling-form iteration (one read of M)
- ``logdomain``: one fused log-domain iteration (stable for any lamb in float32)
- ``labels``: hard labels from the kernel matrix and the column potentials

Each file carries ``torch_reference`` (the plain-torch computation it must match).
Under ``TRITON_INTERPRET=1`` they run on CPU tensors (slowly), which is how CI tests them.
"""
