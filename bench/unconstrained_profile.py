"""Where an unconstrained export's time goes, against constrained pruning at the same kept
parameters (ONNX Runtime CPU, batch 1, 224×224, random init).

``bench/unconstrained.py`` measures ours against constrained pruning matched on kept (non-zero)
parameters; this script says *why* they differ. For each model and per-layer L2 sparsity it
builds the dense model, ``ours_exact`` (the unconstrained plan, reordered, exact reads) and
``constrained_matched`` (the uniform keep ratio with the same non-zero parameters), profiles
each with ORT's per-node profiler, and splits the kernel time into

- ``conv``: Conv / FusedConv / Gemm (the compute the plan keeps),
- ``copy``: Gather / Slice / Concat (what reading channel subsets costs),
- ``layout``: ReorderInput / ReorderOutput (NCHW <-> blocked NCHWc conversions),
- ``other``: everything else (pooling, adds, activations ORT did not fuse),

and the multiply-adds by conv kind (1×1, k×k with k > 1, depthwise, linear).

Each variant is profiled in its own session, ``--rounds`` times in a fresh order each round.
Sessions minutes apart differ by far more than the models do on this host (the dense ResNet-18
took 27-47 ms in three sessions), so absolute figures of different variants are not compared
here: what a session shows reliably is its own *composition*. Per variant the table gives each
category's share of its kernel time (median over rounds). The share of copies bounds what a
better export could gain: with ours' copies free (and nothing else changed), ours ÷ matched
constrained, as ``bench/unconstrained.py`` measured it side by side, would fall to about
``ratio × (1 − copy share of ours) / (1 − copy share of matched)`` — the last column, where
that JSON is present. If that bound is still above 1.05, the gap to constrained is in the
plan's convs, not in the export. Writes ``bench/results/unconstrained_profile.{json,md,png}``.

    python -m bench.unconstrained_profile [--models resnet50 ...] [--sparsity 0.3 0.5]
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from rich.progress import track

import fxprune
from bench._common import RESULTS, argument_parser, commit, cpu_backend, random_init, write_results
from bench.unconstrained import (
    MODELS,
    macs_by_kind,
    matched_constrained,
    nonzero_params,
    ours_over_matched,
)
from fxprune.backends import MeasureConfig
from fxprune.core.io import write_text
from fxprune.rewrite.prune import channel_copies, rewrite

CATEGORY = {
    "Conv": "conv",
    "FusedConv": "conv",
    "Gemm": "conv",
    "Gather": "copy",
    "Slice": "copy",
    "Concat": "copy",
    "ReorderInput": "layout",
    "ReorderOutput": "layout",
}
CATEGORIES = ("conv", "copy", "layout", "other")
PROFILE = MeasureConfig(warmup=5, repeats=30)


def kernel_ms(backend, module: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Kernel time per category: the sum over nodes of each node's median over the timed runs
    of one profiled session (layout conversions included)."""
    out = dict.fromkeys(CATEGORIES, 0.0)
    for k in backend.profile_kernels(module, (x,), PROFILE, exclude=()):
        out[CATEGORY.get(k["op"], "other")] += k["median_ms"]
    return out


def run_case(analysis, x, sparsity: float, backend, rounds: int) -> dict:
    plan = fxprune.unconstrained_plan(
        analysis, fxprune.magnitude_masks(analysis, sparsity, criterion="l2")
    )
    ours, _ = rewrite(analysis, plan, reads="exact")
    keep, matched = matched_constrained(analysis, nonzero_params(ours), 1)
    variants = {"dense": analysis.gm, "constrained_matched": matched, "ours_exact": ours}
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in variants}
    rng = np.random.default_rng(0)
    names = list(variants)
    for _ in range(rounds):
        for i in rng.permutation(len(names)):
            runs[names[i]].append(kernel_ms(backend, variants[names[i]], x))
    out: dict = {"matched_keep": keep, "variants": {}}
    for k, v in variants.items():
        totals = [sum(r.values()) for r in runs[k]]
        gathers, slices = channel_copies(v) if hasattr(v, "graph") else (0, 0)
        out["variants"][k] = {
            "kernel_ms": {c: float(np.median([r[c] for r in runs[k]])) for c in CATEGORIES},
            "share": {
                c: float(np.median([r[c] / t for r, t in zip(runs[k], totals, strict=True)]))
                for c in CATEGORIES
            },
            "total_ms_runs": totals,
            "macs": macs_by_kind(v, x),
            "nonzero_params": nonzero_params(v),
            "gathers": gathers,
            "slices": slices,
        }
    return out


def _copy_free_bound(case: dict, measured: dict | None) -> str:
    """ours ÷ matched (side by side, from bench/unconstrained.py) with ours' copies free."""
    if measured is None:
        return "—"
    ratio = float(np.median(ours_over_matched(measured)))
    ours = case["variants"]["ours_exact"]["share"]["copy"]
    matched = case["variants"]["constrained_matched"]["share"]["copy"]
    exact = measured["ours_exact"]["vs_dense"] / measured["ours"]["vs_dense"]
    return f"{ratio:.3f} → {ratio * exact * (1 - ours) / (1 - matched):.3f}"


def render(out: dict, measured: dict | None = None) -> str:
    lines = [
        "# where the time goes: ours_exact against constrained at matched kept parameters",
        "",
        f"ONNX Runtime CPU, batch 1, 224×224; commit {out.get('commit')}. Share of each "
        "variant's own kernel time (ORT profiler, median over rounds): conv = Conv/FusedConv/"
        "Gemm, copy = Gather/Slice/Concat, layout = NCHWc reorders. GMAC split 1×1 / k×k / "
        "depthwise. Last column: ours ÷ matched as bench/unconstrained.py measured it (its "
        "`ours`) → the same with ours' exact reads and their copies free.",
        "",
        "| model | s | variant | gathers / slices | conv | copy | layout | other "
        "| GMAC 1×1 / k×k / dw | ours ÷ matched → copy-free |",
        "|---|---|---|---|---:|---:|---:|---:|---|---|",
    ]
    for name, cases in out["models"].items():
        for s, case in cases.items():
            m_case = (measured or {}).get("models", {}).get(name, {}).get(s)
            bound = _copy_free_bound(case, m_case["variants"] if m_case else None)
            for k in ("constrained_matched", "ours_exact"):
                v = case["variants"][k]
                sh, m = v["share"], v["macs"]
                g = [m.get(c, 0) / 1e9 for c in ("1x1", "kxk", "depthwise")]
                lines.append(
                    f"| {name} | {s} | {k} | {v['gathers']} / {v['slices']} | "
                    f"{sh['conv']:.1%} | {sh['copy']:.1%} | {sh['layout']:.1%} | "
                    f"{sh['other']:.1%} | {g[0]:.3f} / {g[1]:.3f} / {g[2]:.3f} | "
                    f"{bound if k == 'ours_exact' else ''} |"
                )
    return "\n".join(lines) + "\n"


def plot(out: dict, path: Path) -> None:
    """Stacked share of kernel time per category: matched constrained beside ours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [(n, s, c) for n, cs in out["models"].items() for s, c in cs.items()]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(cases)), 4))
    colours = {"conv": "#4c72b0", "copy": "#dd8452", "layout": "#55a868", "other": "#8c8c8c"}
    for i, (_, _, case) in enumerate(cases):
        for j, k in enumerate(("constrained_matched", "ours_exact")):
            bottom = 0.0
            for c in CATEGORIES:
                h = case["variants"][k]["share"][c]
                label = c if i == 0 and j == 0 else None
                ax.bar(i + 0.38 * (j - 0.5), h, 0.36, bottom=bottom, color=colours[c], label=label)
                bottom += h
            ax.text(i + 0.38 * (j - 0.5), 1.01, "co"[j], ha="center", fontsize=7)
    ax.set_xticks(range(len(cases)), [f"{n}\n{s}" for n, s, _ in cases], fontsize=7)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("share of kernel time")
    ax.set_title("c = constrained at matched kept params, o = ours (exact reads)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argument_parser(
        __doc__, models=MODELS, sparsity=[0.3, 0.5], out=RESULTS / "unconstrained_profile.json"
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--measured",
        type=Path,
        default=RESULTS / "unconstrained.json",
        help="bench/unconstrained.py results, for the copy-free bound",
    )
    p.add_argument("--render", action="store_true", help="only re-render the Markdown and plot")
    args = p.parse_args(argv)
    measured = json.loads(args.measured.read_text()) if args.measured.exists() else None
    if args.render:
        out = json.loads(args.out.read_text())
        write_text(args.out.with_suffix(".md"), render(out, measured))
        plot(out, args.out.with_suffix(".png"))
        return 0
    backend = cpu_backend()
    out: dict = {"backend": repr(backend), "commit": commit(), "models": {}}
    x = torch.randn(1, 3, 224, 224)
    cases = [(n, s) for n in args.models for s in args.sparsity]
    analyses: dict[str, fxprune.Analysis] = {}
    for name, s in track(cases, description="profiling"):
        if name not in analyses:
            analyses[name] = fxprune.analyze(random_init(name), x)
        case = run_case(analyses[name], x, s, backend, args.rounds)
        out["models"].setdefault(name, {})[str(s)] = case
        write_results(args.out, out)
    write_results(args.out, out, render(out, measured))
    plot(out, args.out.with_suffix(".png"))
    print(render(out, measured))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
