"""Coverage over a model zoo: traced, prunable weights, groups, blocks, oracle, compile's plan.

``--zoo torchvision`` (default): every torchvision classifier; writes
``bench/results/coverage.json`` / ``coverage.md``. ``--zoo timm``: the timm selection of
:mod:`bench._timm` (the smallest models of each family, CNN families first, random weights);
each model also goes through ``fxprune.compile`` to 0.5 on a deterministic MAC-count runtime
(:class:`bench._timm.MacsBackend`) whose plan must be valid, have its planned shapes and equal
the masking oracle. Each timm model runs in a forked child with a time limit, so one model that
hangs or exhausts memory is recorded and the run goes on. Writes ``coverage_timm.json`` /
``coverage_timm.md`` with a table of the models that fall short and the op that stops each.

    python -m bench.coverage            # all torchvision models (large ones take a while)
    python -m bench.coverage --plans 3 --models resnet50 mobilenet_v2
    python -m bench.coverage --zoo timm [--models efficientnet_b0 ...] [--timeout 600] [--jobs 2]
"""

from __future__ import annotations

import gc
import time
import traceback
from pathlib import Path

import torch
import torchvision
from rich.console import Console

import fxprune
from bench._common import (
    RESULTS,
    argument_parser,
    make_sensitive,
    progress_bar,
    rel_err,
    write_results,
)
from fxprune.analysis.plans import random_plan
from fxprune.pipeline.report import prunable_fraction
from fxprune.rewrite.shapes import check_planned_shapes


def input_size(name: str) -> int:
    if name.startswith(("vit_", "maxvit_")):
        return 224
    return 96 if name.startswith("inception") else 64


def run_model(name: str, n_plans: int) -> dict:
    row: dict = {"model": name}
    t0 = time.perf_counter()
    torch.manual_seed(0)
    s = input_size(name)
    x = torch.randn(1, 3, s, s)
    model = make_sensitive(torchvision.models.get_model(name, weights=None), x).eval()
    row["params_M"] = sum(p.numel() for p in model.parameters()) / 1e6
    with torch.no_grad():  # an output that ignores the input would make the oracle check vacuous
        row["input_sensitive"] = not torch.allclose(
            model(x), model(torch.randn_like(x)), rtol=1e-3, atol=1e-6
        )
    try:
        t = time.perf_counter()
        a = fxprune.analyze(model, x)
        row["analyze_s"] = time.perf_counter() - t
        row["traced"] = True
    except Exception as exc:
        row.update(traced=False, error=f"{type(exc).__name__}: {exc}"[:300])
        return row
    frac = prunable_fraction(a)
    row.update(
        prunable=frac["prunable"],
        exact=frac["exact"],
        groups=len(a.groups),
        prunable_groups=sum(g.prunable for g in a.groups),
        blocks=len(a.blocks),
    )
    errs = []
    try:
        with torch.no_grad():
            row["empty_plan_bit_identical"] = bool(
                torch.equal(fxprune.prune(a, fxprune.Plan.empty(a))(x), model(x))
            )
            for seed in range(n_plans):
                plan = random_plan(a, seed)
                pruned = fxprune.prune(a, plan)
                check_planned_shapes(a, plan, pruned)  # the oracle cannot see a wrong shape
                errs.append(rel_err(pruned(x), fxprune.masked_forward(a, plan, x)))
        row["oracle_max_rel_err"] = max(errs) if errs else 0.0
        row["oracle_equal"] = all(e <= 1e-4 for e in errs)
    except Exception as exc:
        row.update(oracle_equal=False, error=f"{type(exc).__name__}: {exc}"[:300])
        traceback.print_exc()
    row["total_s"] = time.perf_counter() - t0
    return row


def to_markdown(rows: list[dict]) -> str:
    head = "| model | params (M) | traced | prunable | exact | groups (prunable) | blocks | oracle = pruned | max rel err | analyse (s) | total (s) |"
    lines = [head, "|---|---:|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        if not r.get("traced"):
            lines.append(
                f"| {r['model']} | {r['params_M']:.1f} | no: {r.get('error', '')[:60]} |||||||||"
            )
            continue
        lines.append(
            f"| {r['model']} | {r['params_M']:.1f} | yes | {r['prunable']:.1%} | {r['exact']:.1%} | "
            f"{r['groups']} ({r['prunable_groups']}) | {r['blocks']} | "
            f"{'yes' if r.get('oracle_equal') else 'NO'} | {r.get('oracle_max_rel_err', float('nan')):.1e} | "
            f"{r['analyze_s']:.2f} | {r.get('total_s', float('nan')):.1f} |"
        )
    ok = [r for r in rows if r.get("traced")]
    lines.append("")
    lines.append(
        f"{len(ok)}/{len(rows)} traced; oracle equality on {sum(bool(r.get('oracle_equal')) for r in ok)}/{len(ok)}; "
        f"blocks found in {sum(r['blocks'] > 0 for r in ok)} models; "
        f"output depends on the input (so the oracle check is meaningful) in "
        f"{sum(bool(r.get('input_sensitive')) for r in rows)}/{len(rows)}."
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argument_parser(__doc__)
    p.add_argument("--zoo", choices=("torchvision", "timm"), default="torchvision")
    p.add_argument("--models", nargs="*", default=None)
    p.add_argument("--plans", type=int, default=3, help="random plans per model")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per timm model")
    p.add_argument(
        "--jobs", type=int, default=1, help="timm models run at once (each in its own child)"
    )
    p.add_argument(
        "--attention",
        choices=("head_dim", "heads", "auto"),
        default="auto",
        help="what multi-head splits offer (timm only; fxprune.analyze's attention=)",
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.zoo == "timm":
        from bench.coverage_timm import run_zoo

        return run_zoo(args.models, args.plans, args.timeout, args.out, args.jobs, args.attention)
    names = args.models or torchvision.models.list_models(module=torchvision.models)
    rows = []
    console = Console(stderr=True)
    with progress_bar(console) as progress:
        task = progress.add_task("coverage", total=len(names))
        for name in names:
            progress.update(task, description=f"coverage: {name}")
            rows.append(run_model(name, args.plans))
            gc.collect()
            progress.advance(task)
    env = {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "plans_per_model": args.plans,
    }
    write_results(args.out / "coverage.json", {"env": env, "rows": rows}, to_markdown(rows))
    console.print(to_markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
