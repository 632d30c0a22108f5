"""Fine-tuning: it learns, its distillation is the textbook one, it resumes bit for bit, and
two data-parallel ranks train the model one process trains on the whole batch."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from helpers import spawn_gloo
from torch import nn

import fxprune
from fxprune import FinetuneConfig
from fxprune.analysis.plans import uniform_plan
from fxprune.core.errors import ConfigError
from fxprune.tuning.finetune import distillation_loss

QUIET = {"progress": False}


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def _batches(n: int = 3, size: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 3, generator=g)
    out = []
    for _ in range(n):
        x = torch.randn(size, 6, generator=g)
        out.append((x, (x @ w).argmax(1)))
    return out


def test_distillation_loss_is_the_hand_computation():
    g = torch.Generator().manual_seed(0)
    s, t, temp = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g), 3.0
    q = torch.softmax(t / temp, 1)
    want = (q * (q.log() - torch.log_softmax(s / temp, 1))).sum(1).mean() * temp**2
    torch.testing.assert_close(distillation_loss(s, t, temp), want)
    pair = distillation_loss({"a": s, "b": [s]}, {"a": t, "b": [t]}, temp)
    torch.testing.assert_close(pair, 2 * want)
    with pytest.raises(ValueError, match="differ in structure"):
        distillation_loss({"a": s}, (t,), temp)


def test_pruned_model_learns_and_the_teacher_is_untouched():
    """A pruned ResNet-18 distils its dense teacher's own decisions: the loss falls."""
    torch.manual_seed(0)
    teacher = torchvision.models.resnet18(num_classes=3).eval()
    x = torch.randn(1, 3, 16, 16)
    a = fxprune.analyze(teacher, x)
    student = fxprune.prune(a, uniform_plan(a, 0.5))
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(8, 3, 16, 16, generator=g) for _ in range(4)]
    with torch.no_grad():
        data = [(x, teacher(x).argmax(1)) for x in inputs]
    before = copy.deepcopy(teacher.state_dict())
    fxprune.recalibrate_norms(student, data)

    def loss() -> float:  # the training objective, evaluated in eval mode
        with torch.no_grad():
            return sum(
                float(0.5 * distillation_loss(student(x), teacher(x), 4.0)
                      + 0.5 * F.cross_entropy(student(x), y))
                for x, y in data
            ) / len(data)  # fmt: skip

    start = loss()
    config = FinetuneConfig(epochs=5, lr=0.005, schedule="cosine", **QUIET)
    result = fxprune.finetune(student, data, teacher=teacher, config=config)
    assert len(result.losses) == 5 and result.steps == 20
    assert result.losses[-1] < 0.85 * result.losses[0], result.losses
    assert loss() < 0.95 * start
    assert not student.training and not teacher.training
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())


def test_loss_terms_follow_what_the_batch_has():
    model, data = _mlp(), _batches()
    torch.manual_seed(1)
    teacher = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    with pytest.raises(ValueError, match="needs a teacher"):
        fxprune.finetune(model, [x for x, _ in data], config=FinetuneConfig(**QUIET))
    unlabelled = fxprune.finetune(model, [x for x, _ in data], teacher=teacher,
                                  config=FinetuneConfig(**QUIET))  # fmt: skip
    assert unlabelled.losses[0] > 0


class _Interrupt(Exception):
    pass


class _Stops:
    """Batches that raise after ``after`` of them (a killed job), with a length."""

    def __init__(self, data, after: int):
        self.data, self.after, self.seen = data, after, 0

    def __len__(self):
        return len(self.data)

    def __iter__(self):
        for b in self.data:
            if self.seen == self.after:
                raise _Interrupt
            self.seen += 1
            yield b


def test_resume_from_checkpoint_is_bit_identical(tmp_path):
    data = _batches()
    straight = _mlp()
    common = {"epochs": 3, "lr": 0.1, "schedule": "onecycle", **QUIET}
    fxprune.finetune(straight, data, config=FinetuneConfig(**common))
    ckpt = tmp_path / "ft.pt"
    config = FinetuneConfig(checkpoint=ckpt, resume=True, **common)
    broken = _mlp()
    with pytest.raises(_Interrupt):  # dies in the second epoch
        fxprune.finetune(broken, _Stops(data, after=4), config=config)
    resumed = _mlp()  # a fresh process: only the checkpoint survives
    result = fxprune.finetune(resumed, data, config=config)
    assert result.resumed_from_epoch == 1 and result.steps == 9 and len(result.losses) == 3
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_corrupt_checkpoint_says_what_to_do(tmp_path):
    ckpt = tmp_path / "ft.pt"
    ckpt.write_bytes(b"not a checkpoint")
    config = FinetuneConfig(checkpoint=ckpt, resume=True, **QUIET)
    with pytest.raises(ValueError, match=r"cannot resume from .*Delete it"):
        fxprune.finetune(_mlp(), _batches(), config=config)


@pytest.mark.parametrize(
    ("field", "value"),
    [("epochs", 0), ("lr", -1.0), ("kd_weight", 1.5), ("schedule", "step"), ("resume", True),
     ("max_batches", 0)],
)  # fmt: skip
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ConfigError, match=f"FinetuneConfig.{field}"):
        FinetuneConfig(**{field: value})


def _train_shard(rank: int, world: int) -> dict:
    model = _mlp()
    shard = [(x[rank::world], y[rank::world]) for x, y in _batches()]
    config = FinetuneConfig(epochs=2, lr=0.1, schedule="cosine", **QUIET)
    fxprune.finetune(model, shard, config=config)
    return model.state_dict()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_gloo_ranks_train_what_one_process_trains_on_the_whole_batch():
    states = spawn_gloo(_train_shard)
    single = _mlp()
    config = FinetuneConfig(epochs=2, lr=0.1, schedule="cosine", **QUIET)
    fxprune.finetune(single, _batches(), config=config)
    for k, v in single.state_dict().items():
        assert torch.equal(states[0][k], states[1][k]), f"ranks differ on {k}"
        # mean of two half-batch gradients == the full-batch gradient, up to float rounding
        torch.testing.assert_close(states[0][k], v, rtol=1e-5, atol=1e-6)
    assert not torch.equal(single.state_dict()["0.weight"], _mlp().state_dict()["0.weight"])
