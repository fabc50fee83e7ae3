"""selflabel: fast Sinkhorn-Knopp self-labelling for clustering-based self-supervised learning."""

from .features import sinkhorn_knopp_features
from .result import SinkhornResult
from .solver import sinkhorn_knopp
from .store import ScoreStore

__all__ = ["ScoreStore", "SinkhornResult", "sinkhorn_knopp", "sinkhorn_knopp_features"]
__version__ = "0.1.0"
