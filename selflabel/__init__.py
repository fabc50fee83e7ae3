"""selflabel: fast Sinkhorn-Knopp self-labelling for clustering-based self-supervised learning."""

import os
import sys

if "torch" not in sys.modules:
    # torch's OpenMP threads that wait for work sleep instead of spinning. On a busy machine
    # (DataLoader workers, other jobs) a spinning thread holds a core that the thread a parallel
    # region waits for needs; this matters for torch's own operations (the training steps), not for
    # the solver's passes, which run on selflabel's own sleeping helpers (csrc/kernels.h). OpenMP
    # reads the variable once, when torch loads it, so this acts only where selflabel is imported
    # first (the command line); OMP_WAIT_POLICY=ACTIVE in the environment keeps the spinning.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .result import SinkhornResult
from .solver import sinkhorn_knopp, sinkhorn_knopp_features
from .store import ScoreStore

__all__ = ["ScoreStore", "SinkhornResult", "sinkhorn_knopp", "sinkhorn_knopp_features"]
__version__ = "0.1.0"
