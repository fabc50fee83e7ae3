"""Evaluation against ground-truth classes: clustering scores, kNN and a linear probe.

Everything here is scikit-learn and scipy; large sets are subsampled to ``max_samples``.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


def cluster_accuracy(truth: np.ndarray, pred: np.ndarray) -> float:
    """Accuracy under the best one-to-one matching of clusters to classes (Hungarian)."""
    truth, pred = np.asarray(truth), np.asarray(pred)
    counts = np.zeros((pred.max() + 1, truth.max() + 1), dtype=np.int64)
    np.add.at(counts, (pred, truth), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum() / truth.size)


def cluster_scores(truth: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """NMI, ARI and Hungarian accuracy of a clustering ``pred`` against classes ``truth``."""
    return {"nmi": float(normalized_mutual_info_score(truth, pred)),
            "ari": float(adjusted_rand_score(truth, pred)),
            "acc": cluster_accuracy(truth, pred)}


def _subsample(n: int, max_samples: int, seed: int) -> np.ndarray:
    if n <= max_samples:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_samples, replace=False))


def kmeans_scores(x: np.ndarray, truth: np.ndarray, k: int, *, seed: int = 0,
                  max_samples: int = 20_000) -> dict[str, float]:
    """k-means (k clusters, 10 restarts) on rows of ``x``, scored against ``truth``."""
    idx = _subsample(len(truth), max_samples, seed)
    pred = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x[idx].reshape(len(idx), -1))
    return cluster_scores(truth[idx], pred)


def probe_scores(feats: np.ndarray, truth: np.ndarray, *, seed: int = 0, folds: int = 5,
                 max_samples: int = 20_000) -> dict[str, float]:
    """5-fold accuracies of a cosine 20-NN classifier and of a logistic-regression probe on features."""
    idx = _subsample(len(truth), max_samples, seed)
    x, y = feats[idx].reshape(len(idx), -1), truth[idx]
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    knn = KNeighborsClassifier(n_neighbors=20, metric="cosine", weights="distance")
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    return {"knn_acc": float(cross_val_score(knn, x, y, cv=cv).mean()),
            "linear_acc": float(cross_val_score(probe, x, y, cv=cv).mean())}
