"""Triton GPU kernels (installed as ``selflabel.kernels``)."""
