"""``ExportSpec`` (what ``rebuild`` needs from a plan's notes) and ``rebuild`` of saved plans."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torchvision
from helpers import make_sensitive, rel_err

import fxprune
from fxprune.core.errors import PlanError
from fxprune.rewrite.api import ExportSpec
from fxprune.rewrite.prune import rewrite
from fxprune.rewrite.segment import SegmentCost

X = torch.randn(1, 3, 32, 32)


@pytest.fixture(scope="module")
def unconstrained():
    """resnet18 at 32×32, an unconstrained plan (consumers keep their own inputs), analysed."""
    torch.manual_seed(0)
    model = make_sensitive(torchvision.models.resnet18(weights=None), X).eval()
    analysis = fxprune.analyze(model, X)
    masks = fxprune.magnitude_masks(analysis, 0.3, multiple=8)
    plan = fxprune.unconstrained_plan(analysis, masks, align=8)
    assert plan.consumers
    return model, analysis, plan


def test_spec_round_trips_through_notes_and_json():
    spec = ExportSpec(
        reads={"layer1_0_conv1": "slice", "fc": "gather"},
        segment_block=8,
        segment_cost=SegmentCost(launch_s=4e-5, mac_s=1.3e-11),
        read_block=16,
    )
    notes = spec.to_notes()
    assert notes == {
        "reads": {"layer1_0_conv1": "slice", "fc": "gather"},
        "segment_block": 8,
        "segment_cost": {"launch_s": 4e-5, "mac_s": 1.3e-11},
        "read_block": 16,
    }
    assert ExportSpec.from_notes(json.loads(json.dumps(notes))) == spec
    assert spec.options() == {
        "reads": spec.reads,
        "segment_block": 8,
        "segment_cost": spec.segment_cost,
        "read_block": 16,
    }
    # unset fields are neither written nor passed on; other notes are kept
    assert ExportSpec().to_notes() == {} and ExportSpec().options() == {}
    assert ExportSpec(read_block=8).to_notes() == {"read_block": 8}
    assert ExportSpec.from_notes({"strategy": "compile/minlp"}) == ExportSpec()
    plan = fxprune.Plan({}, (), "sig", {"strategy": "x", "read_block": 4})
    recorded = ExportSpec(reads={}).recorded_in(plan)
    assert recorded.notes == {"strategy": "x", "reads": {}}  # replaces the earlier spec


@pytest.mark.parametrize(
    ("notes", "key"),
    [
        ({"reads": {"fc": "teleport"}}, "reads"),
        ({"reads": ["fc"]}, "reads"),
        ({"segment_cost": {"launch_s": 1e-5}}, "segment_cost"),
        ({"segment_block": 0}, "segment_block"),
        ({"read_block": "8"}, "read_block"),
    ],
)
def test_bad_recorded_spec_is_a_plan_error_naming_the_key(notes, key):
    with pytest.raises(PlanError, match=f"'{key}'"):
        ExportSpec.from_notes(notes)


@pytest.mark.parametrize(
    "options",
    [
        {"reads": "exact", "segment_block": 8},
        {"reads": "exact", "segment_block": 8, "segment_cost": SegmentCost(4e-5, 1.3e-11)},
        {"reads": "exact", "read_block": 16},
    ],
    ids=["segments", "priced segments", "padded reads"],
)
def test_plan_saved_by_the_old_code_still_rebuilds(unconstrained, options, tmp_path):
    """A plan JSON whose notes hold the export under the key names compile has always written
    (built here by hand, not by ExportSpec) rebuilds the model it was exported as."""
    model, analysis, plan = unconstrained
    gm, info = rewrite(analysis, plan, **options)
    data = json.loads(plan.to_json())
    data["notes"]["reads"] = {name: read.kind for name, read in info.reads.items()}
    if "segment_block" in options:
        data["notes"]["segment_block"] = options["segment_block"]
    if "segment_cost" in options:
        cost = options["segment_cost"]
        data["notes"]["segment_cost"] = {"launch_s": cost.launch_s, "mac_s": cost.mac_s}
    if "read_block" in options:
        data["notes"]["read_block"] = options["read_block"]
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    spec = ExportSpec.from_notes(fxprune.Plan.load(path).notes)
    assert spec == ExportSpec.from_info(info)  # what compile would have recorded
    torch.save(gm.state_dict(), tmp_path / "sd.pt")
    rebuilt = fxprune.rebuild(model, X, path, tmp_path / "sd.pt")
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(X), gm(X))
        assert rel_err(rebuilt(X), fxprune.masked_forward(analysis, plan, X)) < 1e-4
    structure = [n.format_node() for n in gm.graph.nodes]
    assert [n.format_node() for n in rebuilt.graph.nodes] == structure
    # without the recorded keys the plan rebuilds another structure: the keys were read
    assert [n.format_node() for n in fxprune.rebuild(model, X, plan).graph.nodes] != structure


def test_recorded_reads_change_the_rebuilt_structure(unconstrained):
    """The recorded reads are used, not the default: every consumer rebuilt with 'full' reads
    runs no channel copy, unlike the default exact reads (so the test above could fail)."""
    from fxprune.rewrite.prune import channel_copies

    model, analysis, plan = unconstrained
    _, info = rewrite(analysis, plan, reads="exact")
    full = {name: "full" for name in info.reads}
    noted = dataclasses.replace(plan, notes={**plan.notes, **ExportSpec(reads=full).to_notes()})
    assert channel_copies(fxprune.rebuild(model, X, noted)) == (0, 0)
    assert channel_copies(fxprune.rebuild(model, X, plan)) != (0, 0)
