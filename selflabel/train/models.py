"""Backbones and heads for the training loop.

Backbones map (B, C, H, W) images to (B, D) features and expose ``out_dim``:

- ``mlp``, ``lenet`` and ``smallcnn``: small networks for CPU runs (``mlp`` for 8x8 digits, ``lenet``
  for 28x28 digits, ``smallcnn`` for 32x32 images).
- ``alexnet_small`` / ``alexnet_big``: SeLa's AlexNet with batch norm (conv widths
  64-192-384-256-256 and 96-256-384-384-256), two 4096-wide fully connected layers.
- ``resnet18`` / ``resnet50``: standard residual networks; images of 64 px or less get a
  3x3 stem without the max-pool (CIFAR style).

Heads: ``SelaHeads`` (H linear classifiers of K clusters, SeLa's multi-head setup) and
``CarpHead`` (projection MLP, L2-normalised embedding, weight-normalised prototypes). Both give
``embed(feats)`` and ``score_weights()`` with logits = embed(feats) @ W.T (+ bias), for labelling
from embeddings x weights without the N x K scores (``--implicit``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ARCHS = ("mlp", "lenet", "smallcnn", "alexnet_small", "alexnet_big", "resnet18", "resnet50")


class MLP(nn.Module):
    def __init__(self, in_dim: int, width: int = 256) -> None:
        super().__init__()
        self.out_dim = width
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_dim, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True),
                                 nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, pad: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, pad, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    def __init__(self, channels: int, width: int = 64) -> None:
        super().__init__()
        self.out_dim = 2 * width
        self.net = nn.Sequential(*_conv_bn(channels, width // 2), *_conv_bn(width // 2, width), nn.MaxPool2d(2),
                                 *_conv_bn(width, 2 * width), *_conv_bn(2 * width, 2 * width),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LeNet(nn.Module):
    """A LeNet-style net for 28x28 digits with batch norm: three conv stages, each followed by a 2x2
    max-pool (28 -> 14 -> 7 -> 3), then a ``width``-wide fully connected layer. About 8M multiply-adds
    per image, several times fewer than ``smallcnn``, whose convolutions run at full resolution."""

    def __init__(self, channels: int, image_size: int, width: int = 256) -> None:
        super().__init__()
        side = image_size // 8
        if side < 1:
            raise ValueError(f"--arch lenet needs images of at least 8 px (got {image_size})")
        self.out_dim = width
        self.net = nn.Sequential(*_conv_bn(channels, 32, 5, 1, 2), nn.MaxPool2d(2),
                                 *_conv_bn(32, 64), nn.MaxPool2d(2), *_conv_bn(64, 128), nn.MaxPool2d(2),
                                 nn.Flatten(), nn.Linear(128 * side * side, width), nn.BatchNorm1d(width),
                                 nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class AlexNet(nn.Module):
    """SeLa's AlexNet: five conv layers with batch norm, then two 4096-wide layers."""

    WIDTHS = {"alexnet_small": (64, 192, 384, 256, 256), "alexnet_big": (96, 256, 384, 384, 256)}

    def __init__(self, arch: str, channels: int) -> None:
        super().__init__()
        w = self.WIDTHS[arch]
        self.features = nn.Sequential(
            *_conv_bn(channels, w[0], 11, 4, 2), nn.MaxPool2d(3, 2),
            *_conv_bn(w[0], w[1], 5, 1, 2), nn.MaxPool2d(3, 2),
            *_conv_bn(w[1], w[2]), *_conv_bn(w[2], w[3]), *_conv_bn(w[3], w[4]), nn.MaxPool2d(3, 2),
            nn.AdaptiveAvgPool2d(6), nn.Flatten())
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Linear(w[4] * 36, 4096), nn.BatchNorm1d(4096),
                                        nn.ReLU(inplace=True), nn.Linear(4096, 4096), nn.BatchNorm1d(4096),
                                        nn.ReLU(inplace=True))
        self.out_dim = 4096

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class _Block(nn.Module):
    def __init__(self, cin: int, width: int, stride: int, bottleneck: bool) -> None:
        super().__init__()
        cout = width * (4 if bottleneck else 1)
        if bottleneck:
            layers = [*_conv_bn(cin, width, 1, 1, 0), *_conv_bn(width, width, 3, stride, 1),
                      nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        else:
            layers = [*_conv_bn(cin, width, 3, stride, 1), nn.Conv2d(width, cout, 3, 1, 1, bias=False),
                      nn.BatchNorm2d(cout)]
        nn.init.zeros_(layers[-1].weight)  # each residual branch starts as the identity
        self.branch = nn.Sequential(*layers)
        self.skip = (nn.Identity() if stride == 1 and cin == cout else
                     nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))
        self.cout = cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.branch(x) + self.skip(x))


class ResNet(nn.Module):
    DEPTHS = {"resnet18": ((2, 2, 2, 2), False), "resnet50": ((3, 4, 6, 3), True)}

    def __init__(self, arch: str, channels: int, image_size: int) -> None:
        super().__init__()
        depths, bottleneck = self.DEPTHS[arch]
        if image_size <= 64:
            stem = _conv_bn(channels, 64, 3, 1, 1)
        else:
            stem = [*_conv_bn(channels, 64, 7, 2, 3), nn.MaxPool2d(3, 2, 1)]
        layers, cin = list(stem), 64
        for stage, depth in enumerate(depths):
            for j in range(depth):
                block = _Block(cin, 64 * 2**stage, 2 if (j == 0 and stage > 0) else 1, bottleneck)
                layers.append(block)
                cin = block.cout
        self.net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_backbone(arch: str, channels: int, image_size: int) -> nn.Module:
    if arch == "mlp":
        return MLP(channels * image_size * image_size)
    if arch == "lenet":
        return LeNet(channels, image_size)
    if arch == "smallcnn":
        return SmallCNN(channels)
    if arch in AlexNet.WIDTHS:
        if image_size < 63:
            raise ValueError(f"--arch {arch} needs images of at least 63 px (got {image_size}); "
                             "use --arch smallcnn or resnet18 for small images")
        return AlexNet(arch, channels)
    if arch in ResNet.DEPTHS:
        return ResNet(arch, channels, image_size)
    raise ValueError(f"--arch must be one of {ARCHS}, got {arch!r}")


class SelaHeads(nn.Module):
    """H linear heads of K clusters on shared features: (B, D) -> (H, B, K) logits.

    Like every head, ``forward(f) == embed(f) @ W[h].T + b[h]`` with ``(W, b) = score_weights()``:
    the implicit labelling multiplies embeddings by those weights instead of storing the logits.
    """

    def __init__(self, dim: int, k: int, heads: int) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(dim, k) for _ in range(heads))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return torch.stack([h(feats) for h in self.heads])

    def embed(self, feats: torch.Tensor) -> torch.Tensor:
        """The rows the score weights multiply: the backbone features themselves."""
        return feats

    def score_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weights (H, K, D) and biases (H, K), detached: logits = embed(feats) @ W[h].T + b[h]."""
        return (torch.stack([h.weight for h in self.heads]).detach(),
                torch.stack([h.bias for h in self.heads]).detach())


class CarpHead(nn.Module):
    """Projection MLP -> L2-normalised embedding -> cosine to K unit prototypes / temperature.

    ``prototypes`` is the (K, bottleneck) parameter; ``embed(f)`` the normalised projection z, and
    ``score_weights()`` the (1, K, bottleneck) normalised prototypes / temperature, no bias.
    """

    def __init__(self, dim: int, k: int, hidden: int = 512, bottleneck: int = 128, temperature: float = 0.1) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        self.prototypes = nn.Parameter(torch.randn(k, bottleneck) / bottleneck**0.5)
        self.temperature = temperature

    def embed(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, D) backbone features -> (B, bottleneck) unit embeddings z."""
        return F.normalize(self.mlp(feats), dim=-1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.embed(feats) @ F.normalize(self.prototypes, dim=-1).T / self.temperature

    def score_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weights (1, K, bottleneck), detached, and no bias: logits = embed(feats) @ W[0].T."""
        return (F.normalize(self.prototypes, dim=-1) / self.temperature).detach()[None], None


class Network(nn.Module):
    """Backbone + head; ``features(x)`` (B, D), ``forward(x)`` head outputs."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))
