"""Re-measure every plan a compile bench saved, on plain ONNX Runtime, and nothing else.

``bench.compile`` checks each of its cases once, right after solving, with
:func:`bench.verify.independent_ratio`. On a shared two-core host one noisy interval can push a
single check over the slack, and re-running the whole bench (an hour) to tell noise from a real
miss is wasteful. This script rebuilds each case's pruned model from its saved plan
(``compile_plans/<label>_<budget>_minlp.json``, the same random-init architecture) and measures
it again, interleaved with the dense model, for **every** case of the results file, passed or
not, so nothing is cherry-picked; both figures stay in the record.

Run: ``python -m bench.verify_plans`` (torchvision's ``compile.json``) or ``--zoo timm``;
writes ``compile[_timm]_verify.json`` / ``.md`` (``..._verify_subset`` with ``--models``). A few
minutes; keep the machine quiet. The dense model is the analysed graph, as in the bench.
"""

from __future__ import annotations

import json

import torch

import fxprune
from bench._common import RESULTS, argument_parser, commit, random_init, write_results
from bench.compile import BUDGET_SLACK, case_label, timm_init
from bench.verify import independent_ratio


def verify_case(
    model: torch.nn.Module, dense: torch.nn.Module, x: torch.Tensor, label: str, budget: str
) -> dict:
    """The plain-ORT ratio / budget of the plan saved for ``label`` at ``budget``; ``dense`` is
    the analysed graph of ``model``, which the bench's own check times."""
    pruned = fxprune.rebuild(model, x, RESULTS / "compile_plans" / f"{label}_{budget}_minlp.json")
    got = independent_ratio(pruned, dense, x)
    over = got["ratio"] / float(budget)
    return {**got, "over_budget": over, "pass": over <= BUDGET_SLACK}


def render(out: dict) -> str:
    lines = [
        f"# plain-ORT re-check of saved compile plans ({out['source']}, at {out['commit']})",
        "",
        "Each plan rebuilt and timed again interleaved with its dense model (bench.verify_plans);",
        f"pass when measured / budget ≤ {BUDGET_SLACK}. The bench's own check beside it.",
        "",
        "| model | budget | bench's plain ORT / budget | re-check / budget | pruned ms | dense ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, cases in out["models"].items():
        for budget, c in cases.items():
            if "error" in c:
                lines.append(f"| {name} | {budget} | no plan: {c['error'][:80]} | — | — | — |")
                continue
            mark = "" if c["pass"] else " FAIL"
            before = c.get("bench_over_budget")
            before_s = "—" if before is None else f"{before:.3f}"
            lines.append(
                f"| {name} | {budget} | {before_s} | {c['over_budget']:.3f}{mark} "
                f"| {c['pruned_ms']:.2f} | {c['dense_ms']:.2f} |"
            )
    n = sum(len(c) for c in out["models"].values())
    ok = sum(c.get("pass", False) for cases in out["models"].values() for c in cases.values())
    lines += ["", f"{ok}/{n} cases within {BUDGET_SLACK} of budget on the re-check."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argument_parser(__doc__)
    p.add_argument("--zoo", choices=("torchvision", "timm"), default="torchvision")
    p.add_argument("--models", nargs="*", default=None, help="default: every model of the file")
    args = p.parse_args(argv)
    stem = "compile_timm" if args.zoo == "timm" else "compile"
    source = json.loads((RESULTS / f"{stem}.json").read_text())
    make = timm_init if args.zoo == "timm" else random_init
    out: dict = {"source": f"{stem}.json", "commit": commit(), "models": {}}
    path = RESULTS / f"{stem}_verify{'_subset' if args.models else ''}.json"
    for name, entry in source["models"].items():
        if args.models and name not in args.models:
            continue
        model = make(name)
        x = torch.randn(1, 3, 224, 224)
        dense = fxprune.analyze(model, x).gm
        for budget, case in entry["cases"].items():
            ours = case.get("ours", {"error": "no case"})
            if "error" in ours:  # listed, so a missing plan is seen, not skipped
                out["models"].setdefault(name, {})[budget] = {"error": ours["error"]}
                continue
            got = verify_case(model, dense, x, case_label(name, args.zoo), budget)
            got["bench_over_budget"] = ours.get("independent_over_budget")
            out["models"].setdefault(name, {})[budget] = got
            print(f"{name} @ {budget}: {got['over_budget']:.3f} of budget", flush=True)
            write_results(path, out, render(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
