"""Evaluation against ground-truth classes: clustering scores, k-means on features, kNN and a linear probe.

Everything here is scikit-learn and scipy, except k-means on the learned features, which uses faiss
when ``faiss-cpu`` is installed (each result names the library); large sets are subsampled to
``max_samples``.

Two accuracies score a clustering: Hungarian (``acc``: the best one-to-one matching of clusters to
classes; with more clusters than classes the unmatched clusters count as wrong) and many-to-one
(``m2o_acc``: every cluster takes the class most of its members have, so several clusters may share
a class; the usual score of over-clustering, equal to or above ``acc``).
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


def _counts(truth: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """(k, classes) how many members of each cluster have each class."""
    counts = np.zeros((k, truth.max() + 1), dtype=np.int64)
    np.add.at(counts, (pred, truth), 1)
    return counts


def cluster_accuracy(truth: np.ndarray, pred: np.ndarray) -> float:
    """Accuracy under the best one-to-one matching of clusters to classes (Hungarian)."""
    truth, pred = np.asarray(truth), np.asarray(pred)
    counts = _counts(truth, pred, pred.max() + 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum() / truth.size)


def majority_classes(truth: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """(k,) the class most members of each cluster have (-1 for an empty cluster)."""
    counts = _counts(truth, pred, k)
    return np.where(counts.sum(1) > 0, counts.argmax(1), -1)


def many_to_one_accuracy(truth: np.ndarray, pred: np.ndarray) -> float:
    """Accuracy when every cluster is read as the class most of its members have."""
    truth, pred = np.asarray(truth), np.asarray(pred)
    return float((majority_classes(truth, pred, pred.max() + 1)[pred] == truth).mean())


def cluster_scores(truth: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """NMI, ARI, Hungarian and many-to-one accuracy of a clustering ``pred`` against classes ``truth``."""
    return {"nmi": float(normalized_mutual_info_score(truth, pred)),
            "ari": float(adjusted_rand_score(truth, pred)),
            "acc": cluster_accuracy(truth, pred), "m2o_acc": many_to_one_accuracy(truth, pred),
            "clusters": int(np.unique(pred).size)}


def heldout_scores(train_truth: np.ndarray, train_pred: np.ndarray, held_truth: np.ndarray,
                   held_pred: np.ndarray, k: int) -> dict[str, float]:
    """Clusters of held-out samples (assigned by a model fitted on the training ones) against their classes.

    NMI and ARI as ``cluster_scores``; ``m2o_acc`` reads each cluster as the majority class of the
    *training* samples in it (a held-out sample in a cluster no training sample fell in counts as wrong),
    so no held-out class is used to score the held-out assignment.
    """
    mapping = majority_classes(train_truth, train_pred, k)
    return {"nmi": float(normalized_mutual_info_score(held_truth, held_pred)),
            "ari": float(adjusted_rand_score(held_truth, held_pred)),
            "m2o_acc": float((mapping[held_pred] == held_truth).mean()), "samples": int(held_truth.size)}


def _kmeans_fit(x: np.ndarray, k: int, seed: int, n_init: int = 10):
    """(centroids (k, D), library): faiss's k-means when installed, else scikit-learn's."""
    try:
        import faiss
    except ImportError:
        km = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(x)
        return km.cluster_centers_.astype(np.float32), "scikit-learn"
    # faiss keeps the seed in a signed 32-bit int; train's --seed goes up to 2**32 - 1
    km = faiss.Kmeans(x.shape[1], k, niter=50, nredo=n_init, seed=seed % 2**31, verbose=False)
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    return km.centroids, f"faiss {faiss.__version__}"


def _nearest(x: np.ndarray, centroids: np.ndarray, rows: int = 65_536) -> np.ndarray:
    """Index of each row's nearest centroid, in row blocks (|x|^2 is the same for every centroid)."""
    c2 = (centroids**2).sum(1)
    out = np.empty(len(x), dtype=np.int64)
    for lo in range(0, len(x), rows):
        out[lo:lo + rows] = (c2 - 2 * x[lo:lo + rows] @ centroids.T).argmin(1)
    return out


def kmeans_features(feats: np.ndarray, truth: np.ndarray, k: int, *, seed: int = 0,
                    held_feats: np.ndarray | None = None, held_truth: np.ndarray | None = None,
                    max_samples: int = 20_000) -> dict:
    """k-means (k clusters, 10 restarts) on L2-normalised features (N, D), fitted on at most
    ``max_samples`` of them (as the other evaluations) and scored against ``truth`` with every sample
    at its nearest centroid; with ``held_feats``, held-out samples go to theirs and are scored too."""
    def unit(a: np.ndarray) -> np.ndarray:
        a = a.reshape(len(a), -1).astype(np.float32)
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

    x = unit(feats)
    centroids, library = _kmeans_fit(x[_subsample(len(x), max_samples, seed)], k, seed)
    pred = _nearest(x, centroids)
    out: dict = {**cluster_scores(truth, pred), "library": library}
    if held_feats is not None and held_truth is not None and len(held_truth):
        out["heldout"] = heldout_scores(truth, pred, held_truth, _nearest(unit(held_feats), centroids), k)
    return out


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
