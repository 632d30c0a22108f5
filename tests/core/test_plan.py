"""Plan JSON round trip and every validation error."""

from __future__ import annotations

import json
import re
from pathlib import Path

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
    data = {"format": "fxprune.plan", "version": 1, "groups": {"conv1": [1, 1, 2]}}
    with pytest.raises(fxprune.PlanError, match="duplicate"):
        fxprune.Plan.from_dict(data)


def test_non_integer_and_bad_format():
    with pytest.raises(fxprune.PlanError, match="integers"):
        fxprune.Plan.from_dict({"format": "fxprune.plan", "version": 1, "groups": {"a": [0.5]}})
    with pytest.raises(fxprune.PlanError, match="Not an fxprune plan"):
        fxprune.Plan.from_dict({"groups": {}})
    with pytest.raises(fxprune.PlanError, match="version"):
        fxprune.Plan.from_dict({"format": "fxprune.plan", "version": 99})
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


# ---------------------------------------------------------------------- strict file schema

_PLANS = sorted((Path(__file__).parents[2] / "bench" / "results" / "compile_plans").glob("*.json"))


def _doc(**fields) -> dict:
    return {"format": "fxprune.plan", "version": 1, **fields}


def test_kept_instead_of_groups_is_an_error_that_says_groups():
    with pytest.raises(fxprune.PlanError, match=r"'kept'.*'groups'") as err:
        fxprune.Plan.from_dict(_doc(kept={"conv1": [0, 1]}))
    for name in ("consumers", "format", "groups", "notes", "removed_blocks", "signature"):
        assert name in str(err.value)


def test_unknown_key_lists_the_allowed_names():
    with pytest.raises(fxprune.PlanError, match=r"unknown key 'group'.*allowed.*removed_blocks"):
        fxprune.Plan.from_dict(_doc(group={}))


@pytest.mark.parametrize("text", ["[1, 2, 3]", "null", "3", '"plan"', "true"])
def test_non_object_json_is_a_plan_error(text):
    with pytest.raises(fxprune.PlanError, match="JSON object"):
        fxprune.Plan.from_json(text)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"notes": [1, 2]}, "'notes' must be a JSON object.*list"),
        ({"notes": None}, "'notes' must be a JSON object"),
        ({"signature": 7}, "'signature' must be a string.*number 7"),
        ({"groups": [[0, 1]]}, "'groups' must be a JSON object.*list"),
        ({"groups": {"conv1": 3}}, "Group 'conv1'.*list of kept indices.*number 3"),
        ({"groups": {"conv1": None}}, "Group 'conv1'.*list of kept indices"),
        ({"consumers": {"fc": "0,1"}, "version": 2}, "Consumer 'fc'.*list of kept indices"),
        ({"removed_blocks": "add_1"}, "'removed_blocks' must be a list.*str"),
        ({"removed_blocks": ["add_1", 3]}, r"'removed_blocks'\[1\] must be a block name.*3"),
        ({"removed_blocks": ["add_1", "add_1"]}, "'removed_blocks' names 'add_1' twice"),
        ({"version": True}, "version"),
        ({"version": "1"}, "version"),
        ({"version": None}, "version"),
        ({"format": None}, "Not an fxprune plan"),
        ({"consumers": {"fc": [0]}}, "version 1.*'consumers'.*version 2"),
    ],
)
def test_every_field_type_is_checked(fields, match):
    with pytest.raises(fxprune.PlanError, match=match):
        fxprune.Plan.from_dict(_doc(**fields))


_BAD_INDEX = st.one_of(
    st.integers(max_value=-1),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=3),
    st.none(),
)


@settings(max_examples=60, deadline=None)
@given(
    good=st.lists(st.integers(0, 500), unique=True, max_size=8),
    bad=_BAD_INDEX,
    at=st.integers(0, 8),
    section=st.sampled_from(["groups", "consumers"]),
)
def test_bad_index_names_the_entry_and_the_position(good, bad, at, section):
    at = min(at, len(good))
    idx = [*good[:at], bad, *good[at:]]
    what = "Group" if section == "groups" else "Consumer"
    data = _doc(version=2, **{section: {"ok": [0], "layer2.0.conv1": idx}})
    with pytest.raises(fxprune.PlanError, match=rf"{what} 'layer2\.0\.conv1'.*position {at}") as e:
        fxprune.Plan.from_dict(data)
    assert json.dumps(bad) in str(e.value)


@settings(max_examples=40, deadline=None)
@given(
    idx=st.lists(st.integers(0, 20), min_size=2, max_size=12).filter(lambda v: len(set(v)) < len(v))
)
def test_duplicate_index_names_the_group_and_the_index(idx):
    dup = sorted({i for i in idx if idx.count(i) > 1})[:5]
    with pytest.raises(fxprune.PlanError, match=rf"Group 'g'.*duplicate .* {re.escape(str(dup))}"):
        fxprune.Plan.from_dict(_doc(groups={"g": idx}))


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b'{"format": "fxprune.plan", "version": 1, "notes": "caf\xe9"}', "not UTF-8 text"),
        (b"\xff\xfe\x00{", "not UTF-8 text"),
        (b'{"format": "fxprune.plan", "version": 1,', "not valid JSON"),
        (b"[1, 2, 3]", "JSON object"),
        (b'{"format": "fxprune.plan", "version": 1, "kept": {}}', "'kept'"),
    ],
)
def test_bad_file_is_a_plan_error_naming_the_file(tmp_path, content, match):
    path = tmp_path / "my_plan.json"
    path.write_bytes(content)
    with pytest.raises(fxprune.PlanError, match=match) as err:
        fxprune.Plan.load(path)
    assert "my_plan.json" in str(err.value)


def test_everything_save_writes_loads_back(tmp_path):
    notes = {
        "budget": "0.5× dense",
        "input_shapes": [[1, 3, 32, 32]],
        "segment_cost": {"conv_ms": 0.03, "mac_ms": 1.3e-8},
        "reads": {"fc": "gather"},
        "dense_stable": True,
        "nothing": None,
    }
    plan = fxprune.Plan({"conv1": (0, 3), "b": ()}, ("add_1",), "abc", notes, {"fc": (1, 2)})
    plan.save(tmp_path / "p.json")
    again = fxprune.Plan.load(tmp_path / "p.json")
    assert again == plan and again.to_dict() == plan.to_dict()


def test_committed_plans_are_there():
    assert len(_PLANS) >= 10


@pytest.mark.parametrize("path", _PLANS, ids=lambda p: p.stem)
def test_committed_plan_loads_unchanged(path):
    plan = fxprune.Plan.load(path)
    assert plan.to_dict() == json.loads(path.read_text(encoding="utf-8"))
    assert plan.kept or plan.removed_blocks


def test_a_plan_without_the_attention_note_indexes_head_dim_positions():
    # compile notes analyze(attention=); a plan from before the option indexed positions,
    # whatever the default is now
    assert fxprune.Plan(kept={}).attention == "head_dim"
    assert fxprune.Plan(kept={}, notes={"attention": "auto"}).attention == "auto"
