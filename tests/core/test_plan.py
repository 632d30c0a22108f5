"""Plan JSON round trip and every validation error."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import plans

import fxprune
from fxprune.analysis.plans import random_plan


@pytest.fixture(scope="module")
def analysis():
    return fxprune.analyze(torchvision.models.resnet18(), torch.randn(1, 3, 32, 32))


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_json_round_trip(analysis, data):
    plan = data.draw(plans(analysis))
    again = fxprune.Plan.from_json(plan.to_json())
    assert again == plan
    assert again.to_json() == plan.to_json()  # deterministic text
    again.validate(analysis)


def test_save_load(analysis, tmp_path):
    plan = random_plan(analysis, 3)
    plan.save(tmp_path / "p.json")
    assert fxprune.Plan.load(tmp_path / "p.json") == plan
    assert not list(tmp_path.glob("*.tmp"))


def _err(analysis, plan, match):
    with pytest.raises(fxprune.PlanError, match=match):
        plan.validate(analysis)


def test_other_architecture(analysis):
    other = fxprune.analyze(torchvision.models.resnet34(), torch.randn(1, 3, 32, 32))
    _err(analysis, random_plan(other, 0), "another architecture")


def test_out_of_range(analysis):
    _err(
        analysis, fxprune.Plan({"layer1.0.conv1": (0, 64)}, (), analysis.signature), "out of range"
    )


def test_duplicate_indices_in_file():
    data = {"format": "fxprune.core.plan", "version": 1, "groups": {"conv1": [1, 1, 2]}}
    with pytest.raises(fxprune.PlanError, match="duplicate"):
        fxprune.Plan.from_dict(data)


def test_non_integer_and_bad_format():
    with pytest.raises(fxprune.PlanError, match="integers"):
        fxprune.Plan.from_dict(
            {"format": "fxprune.core.plan", "version": 1, "groups": {"a": [0.5]}}
        )
    with pytest.raises(fxprune.PlanError, match="Not an fxprune plan"):
        fxprune.Plan.from_dict({"groups": {}})
    with pytest.raises(fxprune.PlanError, match="version"):
        fxprune.Plan.from_dict({"format": "fxprune.core.plan", "version": 99})
    with pytest.raises(fxprune.PlanError, match="not valid JSON"):
        fxprune.Plan.from_json("{truncated")


def test_emptied_group_outside_removed_block(analysis):
    _err(analysis, fxprune.Plan({"layer1.0.conv1": ()}, (), analysis.signature), "keeps no channel")
    block = analysis.blocks[0]
    inner = analysis.internal_groups(block)[0]
    fxprune.Plan({inner: ()}, (block.name,), analysis.signature).validate(analysis)


def test_frozen_group_unknown_group_unknown_block(analysis):
    _err(analysis, fxprune.Plan({"fc": (0,)}, (), analysis.signature), "frozen")
    _err(analysis, fxprune.Plan({"nope": (0,)}, (), analysis.signature), "Unknown group")
    _err(analysis, fxprune.Plan({}, ("add_99",), analysis.signature), "not a removable block")


def test_json_is_plain(analysis):
    data = json.loads(random_plan(analysis, 1).to_json())
    assert set(data) == {"format", "version", "signature", "groups", "removed_blocks", "notes"}
