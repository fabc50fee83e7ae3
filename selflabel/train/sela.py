"""SeLa's training loss with several views (SeLa-v2, as run in Caron et al. 2020, "Unsupervised
Learning of Visual Features by Contrasting Cluster Assignments").

A relabelling solves one balanced labelling over V augmented views of every image, so each view of
each image gets its own label per head. A training step draws V fresh views and trains view j on
the label of view j + 1 (mod V): the network learns to predict what another augmentation of the
same image was labelled, which asks for features that do not change under the augmentations.
With one view this is SeLa's original loss: cross-entropy on the image's own label.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swapped_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each view's logits against the next view's label, over heads, views and samples.

    Args:
        logits: (H, V * B, K) head outputs of V views of B samples, view by view (``model(torch.cat(views))``).
        labels: (H, V, B) long, the labels of those samples' views from the last relabelling.
    """
    heads, n_views, batch = labels.shape
    if logits.shape[:2] != (heads, n_views * batch):
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}: "
                         f"expected ({heads}, {n_views * batch}, K)")
    target = labels.roll(-1, dims=1).reshape(-1)
    return F.cross_entropy(logits.reshape(heads * n_views * batch, -1), target)
