"""A budget met under torch.compile (inductor), with the same plan's ONNX Runtime latency beside it.

For each model (torchvision, random weights, batch 1, 224×224 by default): ``fxprune.compile(...,
backend="inductor")`` at the budget, with fresh latency tables (a temporary cache). Then the
pruned model is timed again side by side with the dense model compiled the same way
(``--repeats`` shuffled side-by-side runs, the paired pruned/dense ratio: measured/budget,
target ≤ 1.03), and the same two models side by side on ONNX Runtime CPU (no spinning): the
ORT-vs-inductor difference of one plan. Compile time of every stage comes from
``CompileResult.timings``; the tables' unit figures and the compiles they took
(``InductorBackend.unit_compiles``: one shape-generic compile per kind of unit) are recorded.
Writes ``bench/results/pipelines.json`` and ``pipelines.md``.

    python -m bench.pipelines [--models resnet50 mobilenet_v2] [--budget 0.5] [--size 224]
    python -m bench.pipelines --models resnet18 --size 64 --repeats 1 --threads 1 --out /tmp/p.json

(from the repository root; latency figures need a quiet machine).
"""

from __future__ import annotations

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
    paired_ratios,
    random_init,
    write_results,
)
from fxprune.backends import InductorBackend, OnnxRuntimeBackend, inductor_available

MODELS = ["resnet50", "mobilenet_v2"]
BUDGET_SLACK = 1.03  # measured / budget must stay at or under this


def _ratio(backend, dense, pruned, x, repeats: int) -> dict:
    """Pruned / dense on ``backend``: median and range of the paired ratios, both medians."""
    ratios, rounds = paired_ratios(backend, {"dense": dense, "pruned": pruned}, x, repeats)
    runs = ratios["pruned"]
    return {
        "ratio": float(np.median(runs)),
        "ratio_runs": [float(r) for r in runs],
        "dense_ms": float(np.median([r["dense"].median_ms for r in rounds])),
        "pruned_ms": float(np.median([r["pruned"].median_ms for r in rounds])),
    }


def run_model(name: str, args) -> dict:
    """Compile ``name`` for inductor at the budget; re-time it on inductor and on ORT."""
    model = random_init(name)
    x = torch.randn(args.batch, 3, args.size, args.size)
    cache_dir = Path(tempfile.mkdtemp(prefix=f"fxprune-pipelines-{name}-"))
    try:
        backend = InductorBackend(threads=args.threads)
        config = fxprune.CompileConfig(
            cache=cache_dir, progress=False, latency=fxprune.LatencyConfig(progress=False)
        )
        start = time.perf_counter()
        result = fxprune.compile(
            model, args.budget, example_inputs=x, backend=backend, config=config
        )
        wall_s = time.perf_counter() - start
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    dense, pruned = result.analysis.gm, result.model
    inductor = _ratio(InductorBackend(threads=args.threads), dense, pruned, x, args.repeats)
    ort_backend = OnnxRuntimeBackend(provider="cpu", threads=args.threads)
    ort = _ratio(ort_backend, dense, pruned, x, args.repeats)
    tables = result.tables
    return {
        "commit": commit(),
        "summary": result.summary(),
        "compile_over_budget": result.measured_ms / result.budget_ms,
        "inductor": {**inductor, "over_budget": inductor["ratio"] / args.budget},
        "ort": {**ort, "over_budget": ort["ratio"] / args.budget},
        "ort_minus_inductor": ort["ratio"] - inductor["ratio"],
        "pass": inductor["ratio"] / args.budget <= BUDGET_SLACK,
        "timings": result.timings,
        "wall_s": wall_s,
        "tables": None
        if tables is None
        else {
            "unit_figures": tables.points,
            "measured": tables.measured,
            "unit_compiles": backend.unit_compiles,
            "unit_timing": tables.notes.get("unit_timing"),
            "build_s": tables.build_s,
        },
        "rounds": [r.to_dict() for r in result.rounds],
    }


def main(argv=None) -> int:
    p = argument_parser(__doc__, models=MODELS, out=RESULTS / "pipelines.json")
    p.add_argument("--budget", type=float, default=0.5, help="fraction of the dense latency")
    p.add_argument("--size", type=int, default=224, help="input height and width")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="side-by-side runs per ratio")
    p.add_argument(
        "--threads", type=int, default=None, help="CPU threads of both runtimes (default: all)"
    )
    p.add_argument("--render", action="store_true", help="only re-render the Markdown")
    args = p.parse_args(argv)
    if args.render:
        out = json.loads(args.out.read_text())
        write_results(args.out, out, render(out))
        return 0
    why = inductor_available()
    if why is not None:
        print(f"inductor cannot compile here ({why}); it needs a working C++ compiler")
        return 1
    out: dict = {
        "budget": args.budget,
        "input": [args.batch, 3, args.size, args.size],
        "measure": MEASURE.__dict__,
        "repeats": args.repeats,
        "threads": args.threads,
        "models": {},
    }
    for name in args.models:
        try:
            out["models"][name] = run_model(name, args)
        except Exception as exc:  # recorded; the other models still run
            out["models"][name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        write_results(args.out, out)
        print(render({**out, "models": {name: out["models"][name]}}), flush=True)
    write_results(args.out, out, render(out))
    return 0


def render(out: dict) -> str:
    n, _, h, w = out["input"]
    lines = [
        f"# torch.compile (inductor CPU) pipelines: budget {out['budget']}, batch {n}, {h}×{w}, "
        "random weights",
        "",
        "Ratios are pruned / dense measured side by side (median of "
        f"{out['repeats']} paired runs, range in brackets); measured/budget ≤ {BUDGET_SLACK} "
        "passes.",
        "",
        "| model | commit | inductor pruned/dense | inductor meas/budget (compile's) | pass "
        "| ORT pruned/dense | ORT − inductor | dense ms inductor / ORT | speedup |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    stages: list[tuple[str, dict]] = []
    for name, m in out["models"].items():
        if "error" in m:
            lines.append(f"| {name} | fails: {m['error'][:160]} ||||||||")
            continue
        ind, ort = m["inductor"], m["ort"]

        def span(r: dict) -> str:
            runs = r["ratio_runs"]
            return f"{r['ratio']:.3f} ({min(runs):.3f}–{max(runs):.3f})"

        lines.append(
            f"| {name} | {m['commit']} | {span(ind)} | {ind['over_budget']:.3f} "
            f"({m['compile_over_budget']:.3f}) | {'yes' if m['pass'] else 'NO'} | {span(ort)} | "
            f"{m['ort_minus_inductor']:+.3f} | {ind['dense_ms']:.2f} / {ort['dense_ms']:.2f} | "
            f"{1 / ind['ratio']:.2f}× |"
        )
        stages.append((name, m))
    if stages:
        keys = [k for k in stages[0][1]["timings"] if k != "total_s"]
        lines += ["", "Compile time per stage (s; `CompileResult.timings`):", ""]
        lines += ["| model | " + " | ".join(k.removesuffix("_s") for k in keys) + " | total |"]
        lines += ["|---|" + "---:|" * (len(keys) + 1)]
        for name, m in stages:
            t = m["timings"]
            cells = " | ".join(f"{t.get(k, 0.0):.1f}" for k in keys)
            lines.append(f"| {name} | {cells} | {t['total_s']:.1f} |")
        lines += ["", "Latency tables under inductor:", ""]
        lines += ["| model | unit figures | measured | unit compiles | unit timing | build s |"]
        lines += ["|---|---:|---:|---:|---|---:|"]
        for name, m in stages:
            tb = m["tables"] or {}
            lines.append(
                f"| {name} | {tb.get('unit_figures', '—')} | {tb.get('measured', '—')} | "
                f"{tb.get('unit_compiles', '—')} | {tb.get('unit_timing', '—')} | "
                f"{tb.get('build_s', 0.0):.1f} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
