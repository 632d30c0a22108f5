"""Benchmark ``fxprune.compile`` against its baselines on ONNX Runtime CPU, batch 1, 224×224.

For each model (random weights, L2-magnitude importance) and each budget (a fraction of the
dense latency, measured side by side with the pruned model):

* **ours** — ``compile(solver="minlp")``: measured latency / budget, importance kept, blocks
  removed, SCIP status/gap/time, time per stage. The first budget of each model runs on a
  fresh latency cache (cold), the others reuse it (warm).
* **knapsack**, **uniform** — the same budget loop with the baseline solvers.
* **torch-pruning** — ``torch_pruning.MetaPruner`` with ``MagnitudeImportance(p=2)`` (its
  default, per-layer uniform ratio, no rounding), the ratio bisected until its measured latency
  (side by side with dense) is at most ours; importance kept is scored with *our* scores on the
  channels it keeps, so all four columns are comparable.

Every case of ours is also checked independently (:func:`bench.verify.independent_ratio`):
pruned and dense exported with ``torch.onnx.export`` and timed interleaved in plain ONNX
Runtime sessions; the budget holds when that ratio / budget ≤ :data:`BUDGET_SLACK`.

Writes ``bench/results/compile.json`` after every case, ``compile.md`` (tables) and a widths
plot per model (``compile_<model>.png``; timm's ``compile_timm_<model>.png``, as its plans are
``compile_plans/timm_<model>_...``). Run: ``python -m bench.compile`` (about an hour here; ``--models``,
``--budgets``, ``--no-tp`` to narrow it). ``--zoo timm`` runs :data:`TIMM_MODELS` (one CNN of
each of twelve timm families, random weights, 224×224) at 0.5 and 0.3 into
``compile_timm.json`` / ``.md``; a case whose compile fails is recorded with its error and the
run goes on.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import fxprune
from bench._common import (
    MEASURE,
    RESULTS,
    argument_parser,
    commit,
    cpu_backend,
    random_init,
    write_results,
)
from bench.verify import independent_ratio
from fxprune.analysis.importance import magnitude_scores
from fxprune.backends import MeasureConfig, measure_side_by_side
from fxprune.core.io import write_text
from fxprune.latency.tables import LatencyConfig

MODELS = ["resnet50", "mobilenet_v2", "efficientnet_b0", "regnet_y_800mf", "convnext_tiny"]
BUDGETS = [0.5, 0.3, 0.7]  # the first one runs cold
#: one CNN from each of twelve timm families
TIMM_MODELS = [
    "resnet50",
    "efficientnet_b0",
    "mobilenetv3_large_100",
    "convnext_atto",
    "regnety_016",
    "rexnet_100",
    "ghostnet_100",
    "mixnet_s",
    "dla34",
    "densenet121",
    "cspresnet50",
    "hrnet_w18_small",
]
TIMM_BUDGETS = [0.5, 0.3]
BUDGET_SLACK = 1.03  # independent measured / budget must stay at or under this
VERIFY = MeasureConfig(warmup=5, repeats=60, min_seconds=3.0)


def _kept_fraction(analysis, scores: dict[str, np.ndarray], kept: dict[str, np.ndarray]) -> float:
    """Our importance metric for any kept-index sets (groups absent from ``kept`` keep all)."""
    total = kept_sum = 0.0
    for name, s in scores.items():
        g = analysis.group(name)
        if g.frozen or g.size < 2:
            continue
        total += float(s.sum())
        kept_sum += float(s[kept[name]].sum()) if name in kept else float(s.sum())
    return kept_sum / total if total else 1.0


def torch_pruning_plan(model, x, ratio: float, analysis):
    """Prune a copy with Torch-Pruning; return it and our groups' kept indices under it."""
    import torch_pruning as tp

    m = copy.deepcopy(model).eval()
    names = {id(mod): n for n, mod in m.named_modules()}
    heads = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)][-1:]
    pruner = tp.pruner.MetaPruner(
        m,
        x,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=ratio,
        ignored_layers=heads,
    )
    records = {rec.target: rec for rec in analysis.spaces.layers}
    spaces = analysis.spaces
    removed: dict[str, set[int]] = {}
    for group in pruner.step(interactive=True):
        for item in group:
            dep, idxs = item.dep, item.idxs
            if getattr(dep.handler, "__name__", "") != "prune_out_channels":
                continue
            rec = records.get(names.get(id(dep.target.module), ""))
            if rec is None or rec.kind not in ("conv", "linear"):
                continue
            for i in idxs:
                hit = spaces.class_index.get(int(spaces.unit_class[rec.out_units[int(i)]]))
                if hit is not None:
                    removed.setdefault(analysis.groups[hit[0]].name, set()).add(hit[1])
        group.prune()
    kept = {
        name: np.setdiff1d(np.arange(analysis.group(name).size), sorted(r))
        for name, r in removed.items()
    }
    return m, kept


def bench_torch_pruning(model, x, analysis, scores, backend, target_ratio, steps=5):
    """Bisect TP's pruning ratio until its measured latency / dense ≤ ``target_ratio``."""
    lo, hi = 0.0, 0.95
    best = None
    trials = []
    for _ in range(steps):
        ratio = (lo + hi) / 2
        pruned, kept = torch_pruning_plan(model, x, ratio, analysis)
        m_p, m_d = measure_side_by_side(backend, [pruned, analysis.gm], (x,), MEASURE, 1)
        r = m_p.median_ms / m_d.median_ms
        imp = _kept_fraction(analysis, scores, kept)
        trials.append({"ratio": ratio, "latency_ratio": r, "importance_kept": imp})
        if r <= target_ratio:
            hi = ratio
            if best is None or imp > best["importance_kept"]:
                best = {**trials[-1], "measured_ms": m_p.median_ms, "dense_ms": m_d.median_ms}
        else:
            lo = ratio
    return {"best": best, "trials": trials}


def timm_init(name: str) -> torch.nn.Module:
    """The timm model ``name`` with random weights (seed 0), in eval mode."""
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False).eval()


def case_label(name: str, zoo: str) -> str:
    """What a model's files are named by: timm's apart from torchvision's (both have an
    ``efficientnet_b0`` and a ``resnet50``)."""
    return f"timm_{name}" if zoo == "timm" else name


def widths_plot_path(label: str) -> Path:
    """The widths plot of a model's first budget, named by :func:`case_label`."""
    return RESULTS / f"compile_{label}.png"


def run_case(name, model, x, budget, solver, cache, backend):
    start = time.perf_counter()
    config = fxprune.CompileConfig(
        solve=fxprune.SolveConfig(solver=solver),
        measure=MEASURE,
        latency=LatencyConfig(progress=False),
        cache=cache,
        progress=False,
    )
    res = fxprune.compile(model, budget, example_inputs=x, backend=backend, config=config)
    wall = time.perf_counter() - start
    counts = {g: len(idx) for g, idx in res.plan.kept.items()}
    (RESULTS / "compile_plans").mkdir(parents=True, exist_ok=True)
    res.plan.save(RESULTS / "compile_plans" / f"{name}_{budget}_{solver}.json")
    # The loop stops at the first measurement under budget·1.02, which favours lucky draws on
    # a noisy host; an independent side-by-side re-measurement (twice the runs) shows the truth.
    v_p, v_d = measure_side_by_side(
        backend, [res.model, res.analysis.gm], res.analysis.example_inputs, VERIFY, 1
    )
    verified = (v_p.median_ms / v_d.median_ms) / budget
    independent = independent_ratio(res.model, res.analysis.gm, res.analysis.example_inputs[0])
    return res, {
        **res.summary(),
        "independent": independent,
        "independent_over_budget": independent["ratio"] / budget,
        "independent_pass": independent["ratio"] / budget <= BUDGET_SLACK,
        "verified_over_budget": verified,
        "verified_ms": v_p.median_ms,
        "verified_dense_ms": v_d.median_ms,
        "wall_s": wall,
        "timings": res.timings,
        "solver": res.solver,
        "rounds": [r.to_dict() for r in res.rounds],
        "kept_counts": counts,
        "removed_blocks_names": list(res.plan.removed_blocks),
    }


def main(argv=None) -> int:
    p = argument_parser(__doc__, models=MODELS, out=RESULTS / "compile.json")
    p.add_argument("--budgets", nargs="*", type=float, default=BUDGETS)
    p.add_argument("--no-tp", action="store_true", help="skip Torch-Pruning")
    p.add_argument("--baselines", nargs="*", default=["knapsack", "uniform"])
    p.add_argument("--render", action="store_true", help="only re-render the Markdown")
    p.add_argument("--zoo", choices=("torchvision", "timm"), default="torchvision")
    args = p.parse_args(argv)
    make = random_init
    if args.zoo == "timm":
        make = timm_init
        if args.models == MODELS:
            args.models = TIMM_MODELS
        if args.budgets == BUDGETS:
            args.budgets = TIMM_BUDGETS
        if args.out == RESULTS / "compile.json":
            args.out = RESULTS / "compile_timm.json"
        args.no_tp = True  # Torch-Pruning needs per-model configuration on timm's custom layers
    if args.render:
        write_text(args.out.with_suffix(".md"), render(json.loads(args.out.read_text())))
        return 0
    backend = cpu_backend()
    x = torch.randn(1, 3, 224, 224)
    out: dict = {
        "backend": repr(backend),
        "measure": MEASURE.__dict__,
        "budgets": args.budgets,
        "models": {},
    }
    if args.out.exists():  # keep models benchmarked by an earlier (partial) run
        out["models"] = json.loads(args.out.read_text()).get("models", {})
    for name in args.models:
        model = make(name)
        label = case_label(name, args.zoo)  # plan files and plots apart from torchvision's
        cache_dir = Path(tempfile.mkdtemp(prefix=f"fxprune-bench-{name}-"))
        at = commit()
        entry = out["models"].get(name) or {"cases": {}}  # add to cases of an earlier run
        entry["commit"] = at
        out["models"][name] = entry
        try:
            for i, budget in enumerate(args.budgets):
                case: dict = {"cold": i == 0, "commit": at}
                try:
                    ours, case["ours"] = run_case(
                        label, model, x, budget, "minlp", cache_dir, backend
                    )
                except Exception as exc:  # recorded; the other cases still run
                    case["ours"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
                    entry["cases"][str(budget)] = case
                    write_results(args.out, out)
                    print(f"{name} @ {budget}: {case['ours']['error']}", flush=True)
                    continue
                print(
                    f"{name} @ {budget}: ours {case['ours']['measured_over_budget']:.3f}× "
                    f"budget, importance {ours.importance_kept:.3f}",
                    flush=True,
                )
                for solver in args.baselines:
                    try:
                        _, case[solver] = run_case(
                            label, model, x, budget, solver, cache_dir, backend
                        )
                    except fxprune.InfeasibleBudget as exc:
                        case[solver] = {"error": str(exc)}
                if not args.no_tp:
                    scores = magnitude_scores(ours.analysis)
                    target = ours.measured_ms / ours.dense_ms
                    case["torch_pruning"] = bench_torch_pruning(
                        model, x, ours.analysis, scores, backend, target
                    )
                if i == 0:
                    try:
                        from fxprune.pipeline.plots import plot_widths

                        plot_widths(ours.analysis, ours.plan, widths_plot_path(label))
                    except ImportError:
                        pass
                entry["cases"][str(budget)] = case
                write_results(args.out, out)
        finally:
            shutil.rmtree(cache_dir, ignore_errors=True)
    write_results(args.out, out, render(out))
    print(render(out))
    return 0


def render(out: dict) -> str:
    lines = ["# compile benchmark (ONNX Runtime CPU, batch 1, 224×224, random weights)", ""]
    lines += [
        "| model | budget | ours meas/budget (re-measured) | ours imp "
        "| knapsack imp (meas/budget) | uniform imp (meas/budget) | TP imp (lat ratio) "
        "| blocks removed | SCIP s / gap | rounds | total s (cold?) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def base(c, k):
        b = c.get(k)
        if not b:
            return "—"
        if "error" in b:
            return "infeasible"
        return f"{b['importance_kept']:.3f} ({b['measured_over_budget']:.3f})"

    for name, entry in out["models"].items():
        for budget, c in entry["cases"].items():
            o = c["ours"]
            if "error" in o:
                lines.append(f"| {name} | {budget} | fails: {o['error'][:120]} |||||||||")
                continue
            tp = (c.get("torch_pruning") or {}).get("best")
            tps = f"{tp['importance_kept']:.3f} ({tp['latency_ratio']:.3f})" if tp else "—"
            verified = o.get("verified_over_budget")
            again = f" ({verified:.3f})" if verified else ""
            if "independent_over_budget" in o:
                mark = "" if o["independent_pass"] else " FAIL"
                again += f" [plain ORT {o['independent_over_budget']:.3f}{mark}]"
            lines.append(
                f"| {name} | {budget} | {o['measured_over_budget']:.3f}{again} | "
                f"{o['importance_kept']:.3f} | {base(c, 'knapsack')} | {base(c, 'uniform')} | "
                f"{tps} | {o['removed_blocks']} | {o['solver']['time_s']:.1f} / "
                f"{o['solver']['gap']:.1e} | {len(o['rounds'])} | {o['timings']['total_s']:.0f}"
                f"{' (cold)' if c['cold'] else ''} |"
            )
    lines += ["", "Stage timings of ours (s):", ""]
    lines += ["| model | budget | analyze | importance | tables | solve | rewrite | measure |"]
    lines += ["|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, entry in out["models"].items():
        for budget, c in entry["cases"].items():
            t = c["ours"].get("timings")
            if not t:
                continue
            lines.append(
                f"| {name} | {budget} | {t['analyze_s']:.1f} | {t['importance_s']:.1f} | "
                f"{t['tables_s']:.1f} | {t['solve_s']:.1f} | {t['rewrite_s']:.1f} | "
                f"{t['measure_s']:.1f} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
