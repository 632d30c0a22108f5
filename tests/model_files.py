"""Tiny models written to disk in each ``--model`` form, for the CLI and its spec parser.

Each writer puts its files under a directory (a test's ``tmp_path``) and returns the ``--model``
spec that names them. The models are small (a few thousand parameters at 3×32×32) so that a
CLI run on the fake backend takes seconds.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import torch
from torch import nn

#: a functional-style model (parameters applied with F.conv2d / F.batch_norm / F.linear), as
#: ported or generated code looks; ``factory`` returns it, ``with_shape`` names its input too
FACTORY_SOURCE = textwrap.dedent(
    '''
    """A tiny functional-style model for fxprune's CLI tests."""

    import torch
    import torch.nn.functional as F
    from torch import nn


    class Tiny(nn.Module):
        def __init__(self, width=16, classes=10):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.w1 = nn.Parameter(torch.randn(width, 3, 3, 3, generator=g) / 27**0.5)
            self.g1 = nn.Parameter(torch.rand(width, generator=g) + 0.5)
            self.b1 = nn.Parameter(torch.randn(width, generator=g) * 0.1)
            self.register_buffer("rm1", torch.randn(width, generator=g) * 0.1)
            self.register_buffer("rv1", torch.rand(width, generator=g) + 0.5)
            self.w2 = nn.Parameter(torch.randn(width, width, 3, 3, generator=g) / (9 * width) ** 0.5)
            self.fc_w = nn.Parameter(torch.randn(classes, width, generator=g) / width**0.5)
            self.fc_b = nn.Parameter(torch.zeros(classes))

        def forward(self, x):
            x = F.conv2d(x, self.w1, None, 2, 1)
            x = F.batch_norm(x, self.rm1, self.rv1, self.g1, self.b1, False, 0.1, 1e-5)
            x = F.relu(F.conv2d(F.relu(x), self.w2, None, 1, 1))
            x = F.adaptive_avg_pool2d(x, 1).flatten(1)
            return F.linear(x, self.fc_w, self.fc_b)


    def factory():
        return Tiny()


    def with_shape():
        return Tiny(), (2, 3, 40, 40)


    def not_a_model():
        return 42


    def batches():
        g = torch.Generator().manual_seed(1)
        return [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g))
                for _ in range(2)]


    def l1(output, target):
        return (output - F.one_hot(target, output.shape[-1]).float()).abs().mean()


    WIDTH = 16
    '''
)


def write_factory_file(directory: Path, name: str = "tiny_model.py") -> Path:
    """The functional-style model's source as ``directory/name``; its path."""
    path = directory / name
    path.write_text(FACTORY_SOURCE)
    return path


def write_package(directory: Path, package: str) -> str:
    """``directory/package/models.py`` holding the same source; the dotted module name."""
    root = directory / package
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "models.py").write_text(FACTORY_SOURCE)
    return f"{package}.models"


def tiny_sequential() -> nn.Module:
    """conv-bn-relu ×2 → pool → linear, built from torch's own modules (loadable anywhere)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, 2, 1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, 1, 1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    ).eval()


def write_exported(directory: Path, shape: tuple[int, ...] = (1, 3, 32, 32)) -> Path:
    """:func:`tiny_sequential` through ``torch.export`` at ``shape``, saved as a .pt2; its path."""
    path = directory / "tiny.pt2"
    ep = torch.export.export(tiny_sequential(), (torch.randn(shape),))
    torch.export.save(ep, path)
    return path
