"""selflabel: fast Sinkhorn-Knopp self-labelling for clustering-based self-supervised learning."""

from .result import SinkhornResult
from .solver import sinkhorn_knopp
from .store import ScoreStore

__all__ = ["ScoreStore", "SinkhornResult", "sinkhorn_knopp"]
__version__ = "0.1.0"
