"""Importance: magnitude and Taylor scores per group; distributed all-reduce gives equal scores."""

from __future__ import annotations

import os
import re
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torchvision
from helpers import make_sensitive
from torch import nn
from torch.nn import functional as F

import fxprune
from fxprune.analysis.importance import (
    Importance,
    channel_importance,
    magnitude_scores,
    normalize_scores,
    taylor_scores,
)
from fxprune.core.errors import NonFiniteError


def _setup():
    torch.manual_seed(0)
    model = make_sensitive(torchvision.models.resnet18(num_classes=10).eval())
    x = torch.randn(2, 3, 32, 32)
    a = fxprune.analyze(model, x)
    g = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g))
        for _ in range(4)
    ]
    return model, a, data


def test_magnitude_covers_every_prunable_group():
    _, a, _ = _setup()
    scores = magnitude_scores(a)
    for g in a.groups:
        if g.prunable:
            assert scores[g.name].shape == (g.size,) and (scores[g.name] > 0).all()


def test_mean_normalisation_makes_every_group_worth_its_size_and_keeps_each_ranking():
    raw = Importance(
        {"a": np.array([1.0, 3.0]), "b": np.array([1e-6, 0.0, 2e-6]), "z": np.zeros(4)},
        "taylor",
        4,
    )
    assert normalize_scores(raw, "none") is raw
    norm = normalize_scores(raw, "mean")
    assert norm.method == "taylor, mean-normalised" and norm.batches == 4
    np.testing.assert_allclose(norm.scores["a"], [0.5, 1.5])
    np.testing.assert_allclose(norm.scores["b"], [1.0, 0.0, 2.0])
    np.testing.assert_array_equal(norm.scores["z"], np.ones(4))  # no signal: all equal
    for name, s in norm.scores.items():
        assert s.sum() == pytest.approx(len(s))
        assert (np.argsort(s, kind="stable") == np.argsort(raw.scores[name], kind="stable")).all()
    with pytest.raises(ValueError, match="normalize must be one of"):
        normalize_scores(raw, "max")


def test_method_selects_importance_and_taylor_needs_data():
    _, a, data = _setup()
    assert channel_importance(a, data, F.cross_entropy, method="magnitude").method == "l2-magnitude"
    with pytest.raises(ValueError, match="Taylor importance needs data"):
        channel_importance(a, method="taylor")
    with pytest.raises(ValueError, match="method must be one of"):
        channel_importance(a, method="hessian")


def test_magnitude_sums_coupled_members():
    """The residual group's score adds every conv writing or reading the stream."""
    _, a, _ = _setup()
    s = magnitude_scores(a)["conv1"]
    w = a.gm.conv1.weight.detach()
    assert (s > (w.reshape(w.shape[0], -1) ** 2).sum(1).numpy()).all()


def test_taylor_uses_data_and_reports_method():
    model, a, data = _setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    imp = channel_importance(a, data, nn.functional.cross_entropy)
    assert imp.method == "taylor" and imp.batches == 4
    assert set(imp.scores) >= {g.name for g in a.groups if g.prunable}
    assert all(np.isfinite(v).all() and (v >= 0).all() for v in imp.scores.values())
    assert channel_importance(a).method == "l2-magnitude"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # a channel whose BN gamma and beta are zero contributes nothing
    with torch.no_grad():
        a.gm.get_submodule("layer1.0.bn1").weight[3] = 0.0
        a.gm.get_submodule("layer1.0.bn1").bias[3] = 0.0
    zeroed = taylor_scores(a, data, nn.functional.cross_entropy)
    assert zeroed.scores["layer1.0.conv1"][3] == 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        _, a, data = _setup()
        imp = taylor_scores(a, data[rank::world], nn.functional.cross_entropy)
        if rank == 0:
            np.savez(out, **imp.scores)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_distributed_equals_single_process(tmp_path):
    out = str(tmp_path / "scores.npz")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    _, a, data = _setup()
    single = taylor_scores(a, data, nn.functional.cross_entropy).scores
    got = np.load(out)
    for name, v in single.items():
        np.testing.assert_allclose(got[name], v, rtol=1e-5, atol=1e-12)


# -------------------------------------------------------------------- non-finite weights


class SmallNet(nn.Module):
    """conv-BN-ReLU twice, pooled into a linear head: every parameter kind importance reads."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn2(self.conv2(self.stem(x))))
        return self.fc(y.mean((2, 3)))


def _small(poison: str | None = None, value: float = float("nan")) -> nn.Module:
    torch.manual_seed(0)
    model = SmallNet().eval()
    if poison is not None:
        with torch.no_grad():
            model.get_parameter(poison).view(-1)[1] = value
    return model


_X = torch.randn(2, 3, 8, 8)
_POISONED = [
    ("conv2.weight", float("nan")),
    ("conv2.weight", float("inf")),
    ("stem.1.weight", float("-inf")),
    ("fc.weight", float("nan")),
    ("conv2.bias", float("inf")),  # not scored by magnitude, but it breaks the pruned model
]


@pytest.mark.parametrize(("param", "value"), _POISONED)
def test_non_finite_weight_is_an_error_naming_the_parameter(param, value):
    a = fxprune.analyze(_small(param, value), _X)
    for score in (magnitude_scores, channel_importance):
        with pytest.raises(NonFiniteError, match=rf"'{re.escape(param)}'.*{value}") as err:
            score(a)
        assert "checkpoint" in str(err.value)  # says what to do


@pytest.mark.parametrize(("param", "value"), _POISONED[:2])
def test_taylor_refuses_non_finite_weights_before_running(param, value):
    a = fxprune.analyze(_small(param, value), _X)
    calls = []

    def loss(out, target):
        calls.append(1)
        return out.sum()

    with pytest.raises(NonFiniteError, match=re.escape(param)):
        taylor_scores(a, [_X], loss)
    assert calls == []


def test_taylor_names_the_batch_with_a_non_finite_gradient():
    a = fxprune.analyze(_small(), _X)
    batches = [(_X, 0), (_X, 1), (_X, 2), (_X, 3)]

    def loss(out, target):  # batch 2 blows up
        return out.sum() * (float("inf") if target == 2 else 1.0)

    with pytest.raises(NonFiniteError, match=r"batch 2.*gradient of '[a-z0-9.]+\.weight'"):
        taylor_scores(a, batches, loss)
    assert all(np.isfinite(v).all() for v in taylor_scores(a, batches[:2], loss).scores.values())


def test_overflowing_magnitude_score_names_the_group_and_its_layers():
    model = _small()
    with torch.no_grad():
        model.conv2.weight[5, 2, 1, 1] = 1e30  # finite, but its square is not (float32)
    a = fxprune.analyze(model, _X)
    with pytest.raises(NonFiniteError, match=r"group '[^']+' is inf at index \d.*conv2") as err:
        magnitude_scores(a)
    assert "l2-magnitude" in str(err.value)


def test_finite_model_scores_are_finite():
    a = fxprune.analyze(_small(), _X)
    scores = magnitude_scores(a)
    assert scores and all(np.isfinite(v).all() and (v > 0).all() for v in scores.values())
