"""Importance: magnitude and Taylor scores per group; distributed all-reduce gives equal scores."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torchvision
from helpers import make_sensitive
from torch import nn

import fxprune
from fxprune.analysis.importance import channel_importance, magnitude_scores, taylor_scores


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
