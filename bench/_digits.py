"""scikit-learn's handwritten digits as a small image task, and two nets sized for it.

The digits (1797 images of 8×8, ten classes) ship with scikit-learn, so nothing downloads. They
are upsampled to 32×32 and split once (stratified, seed 0) into 1200 training and 597 test
images. The nets are a ResNet-18 with CIFAR's 3×3 stem at a quarter of its width and a
MobileNetV2 at half width with a stride-2 stem: both train to high accuracy in seconds per
epoch on a CPU, and at batch 8 their latency is dominated by their convolutions rather than by
per-op overhead, so channel pruning can move it.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ARCHS", "Loader", "MobileNetV2", "ResNet18", "digits", "make_arch"]

SIZE = 32
TRAIN = 1200


def digits(
    train_per_class: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)``: images ``(N, 1, 32, 32)`` standardised.

    ``train_per_class``: train on that many images of each class and test on all the rest
    (the low-data split: teachers stay below the ceiling the 1200-image split puts every
    method at, and the larger test set resolves a point of accuracy); None: the 1200 / 597
    split.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(d.target, dtype=torch.long)
    idx = np.arange(len(y))
    size = TRAIN if train_per_class is None else 10 * train_per_class
    tr, te = train_test_split(idx, train_size=size, stratify=d.target, random_state=0)
    return x[tr], y[tr], x[te], y[te]


class Loader:
    """Re-iterable batches ``(x, y)``; shuffled with random ±2-pixel shifts when ``train``.

    Each pass draws from the global torch generator, so a seeded caller gets the same batches.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch: int, train: bool) -> None:
        self.x, self.y, self.batch, self.train = x, y, batch, train

    def __len__(self) -> int:
        return -(-len(self.y) // self.batch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.y)) if self.train else torch.arange(len(self.y))
        for i in range(0, len(order), self.batch):
            j = order[i : i + self.batch]
            x = self.x[j]
            if self.train:
                dx, dy = (int(v) for v in torch.randint(-2, 3, (2,)))
                x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            yield x, self.y[j]


class _Basic(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18 (3×3 stem, no max-pool) at ``widths``."""

    def __init__(self, widths=(16, 32, 64, 128), classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        layers, c = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(2):
                layers.append(_Basic(c, w, 2 if (j == 0 and i > 0) else 1))
                c = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class _Inverted(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.residual = stride == 1 and cin == cout
        self.body = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 at ``width`` with a stride-2 stem (16×16 features after it)."""

    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1))  # fmt: skip

    def __init__(self, width: float = 0.5, classes: int = 10) -> None:
        super().__init__()
        c = int(32 * width)
        layers: list[nn.Module] = [
            nn.Conv2d(1, c, 3, 2, 1, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU6(),
        ]
        for expand, out, n, stride in self.SETTINGS:
            out = int(out * width)
            for i in range(n):
                layers.append(_Inverted(c, out, stride if i == 0 else 1, expand))
                c = out
        layers += [nn.Conv2d(c, 640, 1, bias=False), nn.BatchNorm2d(640), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(640, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


ARCHS = {"resnet18_q": ResNet18, "mobilenet_v2_h": MobileNetV2}


def make_arch(name: str, seed: int) -> nn.Module:
    """A fresh ``name`` net, initialised from ``seed``."""
    torch.manual_seed(seed)
    return ARCHS[name]()
