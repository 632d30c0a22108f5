"""Norm recalibration: running statistics re-estimated from data, nothing else touched."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torchvision
from helpers import spawn_gloo
from torch import nn

import fxprune
from fxprune.analysis.plans import uniform_plan


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Conv2d(8, 4, 1)
        self.bn2 = nn.BatchNorm2d(4, momentum=0.3)

    def forward(self, x):
        return self.bn2(self.head(self.drop(torch.relu(self.bn(self.conv(x))))))


def _data(n: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(3, 3, 6, 6, generator=g) * 2 + 1, torch.zeros(3)) for _ in range(n)]


def _expected(model: nn.Module, data, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean of batch means and of unbiased batch variances of ``name``'s input
    (for a norm with no norm before it: its input does not depend on their mode)."""
    seen = []
    hook = model.get_submodule(name).register_forward_hook(lambda m, i, o: seen.append(i[0]))
    model.eval()
    with torch.no_grad():
        for x, _ in data:
            model(x)
    hook.remove()
    means = torch.stack([t.mean((0, 2, 3)) for t in seen])
    variances = torch.stack([t.transpose(0, 1).reshape(t.shape[1], -1).var(1) for t in seen])
    return means.mean(0), variances.mean(0)


def test_statistics_are_the_average_over_the_batches_and_flags_restored():
    torch.manual_seed(0)
    model = Net()
    model.train()
    model.drop.eval()  # a mixed state the pass must give back as it was
    data = _data()
    done = fxprune.recalibrate_norms(model, data)
    assert done == fxprune.tuning.recalibrate.Recalibration(modules=2, batches=4)
    assert model.training and not model.drop.training and model.bn.training
    assert model.bn.momentum == 0.1 and model.bn2.momentum == 0.3
    # bn's input depends on no norm: the hand computation
    want_mean, want_var = _expected(copy.deepcopy(model), data, "bn")
    torch.testing.assert_close(model.bn.running_mean, want_mean)
    torch.testing.assert_close(model.bn.running_var, want_var)
    assert int(model.bn.num_batches_tracked) == 4
    # every norm is estimated in one pass with the others in batch mode, as torch's SWA
    # update_bn does (which runs dropout too: without dropout the two agree)
    torch.manual_seed(0)
    ref = Net()
    ref.drop.p = 0.0
    torch.optim.swa_utils.update_bn([x for x, _ in data], ref)
    torch.testing.assert_close(model.bn2.running_mean, ref.bn2.running_mean)
    torch.testing.assert_close(model.bn2.running_var, ref.bn2.running_var)


def test_dropout_stays_off_and_max_batches_counts():
    torch.manual_seed(0)
    a, b = Net().eval(), Net().eval()
    b.load_state_dict(a.state_dict())
    torch.manual_seed(1)
    fxprune.recalibrate_norms(a, _data(), max_batches=2)
    torch.manual_seed(2)  # a different dropout draw would change the statistics
    fxprune.recalibrate_norms(b, _data()[:2])
    assert torch.equal(a.bn2.running_mean, b.bn2.running_mean)


def test_no_batches_or_no_norms_change_nothing():
    model = Net().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert fxprune.recalibrate_norms(model, iter(())).batches == 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    plain = nn.Sequential(nn.Conv2d(3, 4, 1))
    assert fxprune.recalibrate_norms(plain, _data()).modules == 0


def test_pruned_resnet_statistics_match_the_data_it_sees():
    """On a pruned model (fewer input channels into every BN) the statistics are re-estimated
    from the pruned model's own activations: the first BN by hand, all of them as torch's SWA
    ``update_bn`` does."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4).eval()
    x = torch.randn(1, 3, 32, 32)
    a = fxprune.analyze(model, x)
    pruned = fxprune.prune(a, uniform_plan(a, 0.5))
    data = [(torch.randn(4, 3, 32, 32), None) for _ in range(3)]
    ref = copy.deepcopy(pruned)
    stale = pruned.get_submodule("layer1.0.bn2").running_mean.clone()
    assert fxprune.recalibrate_norms(pruned, data).modules == 20
    assert not torch.equal(pruned.get_submodule("layer1.0.bn2").running_mean, stale)
    want_mean, want_var = _expected(copy.deepcopy(pruned), data, "bn1")
    torch.testing.assert_close(pruned.bn1.running_mean, want_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pruned.bn1.running_var, want_var, rtol=1e-4, atol=1e-5)
    torch.optim.swa_utils.update_bn([x for x, _ in data], ref)
    for name, m in pruned.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            theirs = ref.get_submodule(name)
            torch.testing.assert_close(m.running_mean, theirs.running_mean, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(m.running_var, theirs.running_var, rtol=1e-4, atol=1e-5)


def _recalibrate_shard(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    model = Net().eval()
    done = fxprune.recalibrate_norms(model, _data(4)[rank::world])
    return {"state": model.state_dict(), "batches": done.batches}


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_ranks_agree_with_one_process_on_all_batches():
    results = spawn_gloo(_recalibrate_shard)
    torch.manual_seed(0)
    single = Net().eval()
    fxprune.recalibrate_norms(single, _data(4))
    assert results[0]["batches"] == results[1]["batches"] == 4
    for r in results:
        for k in ("bn.running_mean", "bn.running_var"):
            torch.testing.assert_close(r["state"][k], single.state_dict()[k], rtol=1e-5, atol=1e-6)
        for k, v in r["state"].items():
            assert torch.equal(v, results[0]["state"][k]), f"ranks differ on {k}"
