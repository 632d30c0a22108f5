"""Unconstrained pruning export: gathers and measured latency against constrained pruning, the
naive export and the UPSCALE authors' exporter (ONNX Runtime CPU, batch 1, 224×224, random init).

For each model and per-layer L2 input sparsity: every conv/linear with groups=1 (except the stem)
keeps its (1 - s) largest input columns; the shared tensors keep the union. Variants, measured
side by side in one run (ratios to the dense model of the same run are paired per alternation
round, ``relative_latency``; each case is measured ``--repeats`` times in shuffled orders and the
median ratio reported; a variant whose graph equals another's is timed once):

- ``constrained``: every coupling group keeps its top (1 - s) channels (uniform, L2), no gathers;
  ``constrained_matched``: the uniform keep ratio whose kept (non-zero) parameters match
  ``ours`` (zero columns ``ours`` stores to avoid a copy do not count);
  ``constrained_matched_m8``: the same, with every group's count a multiple of the runtime's
  channel block (8 with AVX2), so that constrained too runs every conv in the blocked layout
  (the fair baseline for ``ours`` once it aligns its reads).
- ``naive``: the unconstrained plan, every non-contiguous consumer gathers, no reordering.
- ``ours_exact``: reordered, consumers read exactly their inputs (slice or gather).
- ``ours_segmented``: ``ours_exact`` with every tensor read in channel ranges carried as
  segments aligned to the runtime's channel block (:mod:`fxprune.rewrite.segment`), cut only
  where a segment pays for its extra convs under the backend's measured price: no Slice left,
  gathers of segmented tensors become zero-column reads.
- ``ours``: reordered, each consumer reads by the fastest of slice/gather/zero-padded span/full
  read, timed per consumer on the backend (``reads="measure"``, what ``fxprune.compile`` uses),
  then the whole model with these reads, with exact reads, segmented, lean (exact reads with
  the gathers that are cheapest to avoid, by the unit timings, read with zero columns, within
  1% of the exact model's latency) and aligned (every conv's inputs a multiple of the
  runtime's channel block: ``rewrite(read_block=)``) and aligned_lean (lean's reads, aligned)
  timed side by side (median of 3): if one wins by 2.5%, the fewest copies among the clear
  winners within 2.5% of the fastest, else the fewest copies among those within 2.5% of exact
  reads; a candidate with fewer copies within 5% of the kept one gets a runoff (the two alone,
  6 measurements) and is kept if that puts it within 2.5%.
- ``authors``: apple-upscale 0.1.1 (is_not_ane=True) where it is installed and runs.

Gathers are counted the same way for every variant (aten-level dispatch during one forward:
index/index_select/gather on activations, bench/_upscale.py). Writes
``bench/results/unconstrained.{json,md,png}``.

    python -m bench.unconstrained [--models resnet18 ...] [--sparsity 0.3 0.5]
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

import fxprune
from bench import _upscale
from bench._common import (
    RESULTS,
    argument_parser,
    commit,
    commits,
    cpu_backend,
    format_paired,
    paired,
    paired_ratios,
    random_init,
    rel_err,
    write_results,
)
from fxprune.core.io import write_text
from fxprune.measure.export_choice import measured_rewrite
from fxprune.measure.reads import MeasuredReads
from fxprune.rewrite.prune import rewrite
from fxprune.rewrite.segment import SegmentCost, segment

MODELS = ["resnet18", "resnet50", "mobilenet_v2", "efficientnet_v2_s", "densenet121"]


def stored_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def nonzero_params(m: torch.nn.Module) -> int:
    return sum(int((p != 0).sum()) for p in m.parameters())


def macs_by_kind(m: torch.nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Multiply-adds of every conv/linear call, by kind: 1x1, kxk (k > 1), depthwise, linear
    (hooks: works on any module)."""
    out: dict[str, int] = {}

    def hook(mod, args, y):
        n = y.numel() * int(np.prod(mod.weight.shape[1:]))
        if isinstance(mod, torch.nn.Linear):
            kind = "linear"
        elif mod.groups > 1 and mod.groups == mod.in_channels:
            kind = "depthwise"
        else:
            kind = "1x1" if all(k == 1 for k in mod.kernel_size) else "kxk"
        out[kind] = out.get(kind, 0) + n

    layers = (torch.nn.modules.conv._ConvNd, torch.nn.Linear)
    handles = [h.register_forward_hook(hook) for h in m.modules() if isinstance(h, layers)]
    with torch.no_grad():
        m(x)
    for h in handles:
        h.remove()
    return out


def macs(m: torch.nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of every conv/linear call."""
    return sum(macs_by_kind(m, x).values())


def matched_constrained(analysis, target: int, multiple: int) -> tuple[float, torch.nn.Module]:
    """The uniform keep ratio whose pruned model keeps about ``target`` parameters (bisection).

    Kept means non-zero: zero weight columns an unconstrained export stores to avoid a copy
    (full reads, segments snapped to the runtime's block) are not kept parameters, and must not
    buy the unconstrained model a larger, slower constrained baseline.
    """
    lo, hi = 0.05, 1.0
    best = None
    for _ in range(10):
        mid = (lo + hi) / 2
        m = fxprune.prune(analysis, fxprune.uniform_plan(analysis, mid, multiple=multiple))
        best = (mid, m)
        if nonzero_params(m) < target:
            lo = mid
        else:
            hi = mid
    return best


def mass_kept(analysis, plan) -> float:
    """Share of the consumers' input-column energy (Σ‖w[:, i]‖²) a plan keeps: the accuracy proxy
    UCPE improves (each consumer keeps its own heaviest columns)."""
    keep_unit = analysis.spaces.keep_units(plan.kept)
    kept = total = 0.0
    for c in analysis.consumers.values():
        w = analysis.gm.get_submodule(c.target).weight.detach()
        energy = (w.transpose(0, 1).reshape(c.n_in, -1) ** 2).sum(1).numpy()
        idx = plan.consumers.get(c.node)
        mask = keep_unit[c.units] if idx is None else np.isin(np.arange(c.n_in), idx)
        kept += float(energy[mask].sum())
        total += float(energy.sum())
    return kept / total


def run_case(name, model, analysis, x, sparsity, backend, multiple, pool, repeats=3) -> dict:
    masks = fxprune.magnitude_masks(analysis, sparsity, criterion="l2", multiple=multiple)
    align = multiple if multiple > 1 else None
    t0 = time.perf_counter()
    plan = fxprune.unconstrained_plan(analysis, masks, align=align)
    plan_s = time.perf_counter() - t0
    variants: dict[str, torch.nn.Module] = {"dense": analysis.gm}
    info: dict[str, dict] = {}
    uniform = fxprune.uniform_plan(analysis, 1 - sparsity, multiple=multiple)
    variants["constrained"] = fxprune.prune(analysis, uniform)
    info["constrained"] = {"mass_kept": mass_kept(analysis, uniform)}
    for key in ("naive", "ours_exact", "ours", "authors"):
        info[key] = {"mass_kept": mass_kept(analysis, plan)}
    kinds_exact = None
    for key, reorder, reads in (
        ("naive", False, "exact"),
        ("ours_exact", True, "exact"),
        ("ours", True, "measure"),
    ):
        t0 = time.perf_counter()
        cost = MeasuredReads(backend) if reads == "measure" else None
        if cost is not None:
            gm, rw, choice = measured_rewrite(analysis, plan, cost, reorder=reorder)
        else:
            gm, rw = rewrite(analysis, plan, reorder=reorder, reads=reads)
        info[key].update(rewrite_s=time.perf_counter() - t0, reads=rw.counts())
        if key == "ours":
            info[key]["orders"] = [o.__dict__ for o in rw.layout.orders]
            info[key]["read_ms"] = cost.decisions
            info[key]["whole_check"] = choice.to_dict() if choice is not None else {}
            same = rw.kinds() == kinds_exact and rw.segment_block is None
            if same:  # the same graph as ours_exact: time it once, not as two models
                gm = variants["ours_exact"]
                info[key]["same_as"] = "ours_exact"
        if key == "ours_exact":
            kinds_exact = rw.kinds()
        variants[key] = gm
    # segmented as the whole-model check built it: merged under the same measured price
    judge = MeasuredReads(backend)
    block = judge.segment_block()
    price = info["ours"]["whole_check"].get("segment_cost")
    price = SegmentCost(**price) if price else judge.segment_cost()
    t0 = time.perf_counter()
    variants["ours_segmented"], seg = segment(variants["ours_exact"], (x,), block, price)
    info["ours_segmented"] = {"mass_kept": info["ours_exact"]["mass_kept"], "block": block}
    info["ours_segmented"].update(
        segment_s=time.perf_counter() - t0,
        segments=seg.segments,
        candidate_segments=sum(r["candidates"] for r in seg.regions),
        segment_reads=seg.reads,
        segment_cost=dataclasses.asdict(price),
    )
    if info["ours"]["whole_check"].get("kept") == "segmented":
        variants["ours_segmented"] = variants["ours"]  # the same graph: time it once
    ratio, variants["constrained_matched"] = matched_constrained(
        analysis, nonzero_params(variants["ours"]), multiple
    )
    info["constrained_matched"] = {"keep": ratio}
    if block > 1:  # the fair baseline: constrained counts in the runtime's channel block too
        ratio, variants["constrained_matched_m8"] = matched_constrained(
            analysis, nonzero_params(variants["ours"]), block
        )
        info["constrained_matched_m8"] = {"keep": ratio, "multiple": block}
    if pool is not None:  # unions bounded: consumers choose from a pool per group
        pooled = fxprune.unconstrained_plan(
            analysis,
            fxprune.magnitude_masks(analysis, sparsity, multiple=multiple, pool=pool),
            align=align,
        )
        cost = MeasuredReads(backend)
        variants["ours_pool"], rw, _ = measured_rewrite(analysis, pooled, cost)
        info["ours_pool"] = {"pool": pool, "reads": rw.counts(), "mass_kept": 0.0}
        info["ours_pool"]["mass_kept"] = mass_kept(analysis, pooled)
        oracle_pool = fxprune.masked_forward(analysis, pooled, x)
        ratio, variants["constrained_matched_pool"] = matched_constrained(
            analysis, nonzero_params(variants["ours_pool"]), multiple
        )
        info["constrained_matched_pool"] = {"keep": ratio}
    if _upscale.available():
        table = analysis.consumers
        target_masks = {table[n].target: m for n, m in masks.items()}
        try:
            t0 = time.perf_counter()
            variants["authors"] = _upscale.authors_export(model, x, target_masks)
            info["authors"]["export_s"] = time.perf_counter() - t0
        except RuntimeError as exc:
            info["authors"] = {"error": str(exc)[:300]}
    want = fxprune.masked_forward(analysis, plan, x)
    oracle_pool = locals().get("oracle_pool")
    out: dict = {"plan_s": plan_s, "consumers": len(plan.consumers), "variants": {}}
    keys = list(variants)
    ratios, rounds = paired_ratios(backend, variants, x, repeats)
    for k in keys:
        m = rounds[-1][k]
        v = variants[k]
        with torch.no_grad():
            y = v(x)
        err = None
        if k in ("naive", "ours_exact", "ours", "ours_segmented", "authors", "ours_pool"):
            ref = oracle_pool if k == "ours_pool" else want
            err = rel_err(y, ref)
        out["variants"][k] = {
            **_upscale.count_gathers(v, x),
            "ms": m.median_ms,
            "stable": m.stable,
            "vs_dense": float(np.median(ratios[k])),  # paired per round, median of repeats
            "vs_dense_runs": ratios[k],
            "stored_params": stored_params(v),
            "nonzero_params": nonzero_params(v),
            "macs": macs(v, x),
            "rel_err_vs_oracle": err,
            **info.get(k, {}),
        }
    return out


def main(argv=None) -> int:
    p = argument_parser(
        __doc__, models=MODELS, sparsity=[0.3, 0.5], out=RESULTS / "unconstrained.json"
    )
    p.add_argument(
        "--multiple",
        type=int,
        default=1,
        help="round kept counts (per-layer masks, unions, constrained groups) to this multiple",
    )
    p.add_argument(
        "--pool", type=float, default=None, help="also run pooled masks (bounded unions)"
    )
    p.add_argument(
        "--backend",
        choices=["ort", "torch"],
        default="ort",
        help="torch: eager PyTorch on CPU, where a batch-1 channel slice is a free view",
    )
    p.add_argument(
        "--repeats", type=int, default=3, help="side-by-side measurements per case (median)"
    )
    p.add_argument("--batch", type=int, default=1, help="batch size of every measurement")
    p.add_argument("--render", action="store_true", help="only re-render the Markdown")
    args = p.parse_args(argv)
    if args.render:
        out = json.loads(args.out.read_text())
        write_text(args.out.with_suffix(".md"), render(out))
        plot(out, args.out.with_suffix(".png"))
        return 0
    backend = cpu_backend(args.backend)
    at = commit()
    out: dict = {"backend": repr(backend), "commit": at}
    out["multiple"] = args.multiple
    out["matched_on"] = "nonzero_params"
    out["models"] = json.loads(args.out.read_text()).get("models", {}) if args.out.exists() else {}
    x = torch.randn(args.batch, 3, 224, 224)
    out["batch"] = args.batch
    for name in args.models:
        model = random_init(name)
        analysis = fxprune.analyze(model, x)
        entry = out["models"].setdefault(name, {})
        for s in args.sparsity:
            entry[str(s)] = run_case(
                name, model, analysis, x, s, backend, args.multiple, args.pool, args.repeats
            )
            entry[str(s)]["commit"] = at  # a rerun of some cases keeps the others' commit
            v = entry[str(s)]["variants"]
            print(
                f"{name} @ {s}: gathers naive {v['naive']['gathers']} ours_exact "
                f"{v['ours_exact']['gathers']} ours {v['ours']['gathers']} authors "
                f"{v.get('authors', {}).get('gathers')}; ours {v['ours']['vs_dense']:.3f}× dense, "
                f"segmented {v['ours_segmented']['vs_dense']:.3f}×, "
                f"matched constrained {v['constrained_matched']['vs_dense']:.3f}×, "
                f"m8 {v.get('constrained_matched_m8', {}).get('vs_dense', float('nan')):.3f}×",
                flush=True,
            )
            write_results(args.out, out)
    write_results(args.out, out, render(out))
    plot(out, args.out.with_suffix(".png"))
    print(render(out))
    return 0


PLOTTED = (
    "constrained_matched",
    "constrained_matched_m8",
    "naive",
    "ours_exact",
    "ours",
    "authors",
)


def plot(out: dict, path: Path) -> None:
    """Latency × dense (top) and gathers (bottom) per case, one bar per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [(n, s, c["variants"]) for n, cs in out["models"].items() for s, c in cs.items()]
    keys = [k for k in PLOTTED if any(k in v for _, _, v in cases)]
    width = 0.8 / len(keys)
    fig, (lat, gat) = plt.subplots(2, 1, figsize=(max(7, 1.2 * len(cases)), 6), sharex=True)
    for j, k in enumerate(keys):
        xs = [i + width * (j - (len(keys) - 1) / 2) for i in range(len(cases))]
        got = [
            (x, v[k]) for x, (_, _, v) in zip(xs, cases, strict=True) if "vs_dense" in v.get(k, {})
        ]
        lat.bar([x for x, _ in got], [r["vs_dense"] for _, r in got], width, label=k)
        gat.bar([x for x, _ in got], [r["gathers"] for _, r in got], width, label=k)
    lat.axhline(1.0, color="grey", lw=0.8, ls="--")
    lat.set_ylabel("latency × dense")
    gat.set_ylabel("gathers")
    gat.set_yscale("symlog", linthresh=10)
    ticks = [0, 2, 5, 10, 30, 100]
    gat.set_yticks(ticks, [str(t) for t in ticks])
    gat.set_xticks(range(len(cases)), [f"{n}\n{s}" for n, s, _ in cases], fontsize=7)
    lat.set_title(f"unconstrained export, {_runtime(out['backend'])}, batch {out.get('batch', 1)}")
    lat.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _runtime(backend_repr: str) -> str:
    return "PyTorch eager CPU" if backend_repr.startswith("TorchEager") else "ONNX Runtime CPU"


def ours_over_matched(v: dict, key: str = "constrained_matched") -> np.ndarray:
    """``ours`` / ``key`` per repeat (paired)."""
    return paired(v, "ours", key)


def _vs_matched(v: dict, key: str = "constrained_matched") -> str:
    return format_paired(v, "ours", key)


def _targets(out: dict) -> list[str]:
    """The issue's two targets, counted over the cases: fewer gathers than the authors' export,
    and ours within 5% of constrained at matched kept parameters (median paired ratio)."""
    fewer = within = within_m8 = n = n_m8 = with_authors = both = 0
    for cases in out["models"].values():
        for case in cases.values():
            v = case["variants"]
            n += 1
            few = ok = False
            if "gathers" in v.get("authors", {}):
                with_authors += 1
                few = v["ours"]["gathers"] < v["authors"]["gathers"]
            ok = bool(np.median(ours_over_matched(v)) <= 1.05)
            fewer, within, both = fewer + few, within + ok, both + (few and ok)
            if "constrained_matched_m8" in v:
                n_m8 += 1
                within_m8 += bool(np.median(ours_over_matched(v, "constrained_matched_m8")) <= 1.05)
    lines = [
        f"Targets: ours has fewer gathers than the authors in {fewer}/{with_authors} cases; "
        f"ours ÷ matched constrained ≤ 1.05 in {within}/{n}; both in {both}/{n}."
    ]
    if n_m8:
        lines.append(
            f"Against constrained with counts in multiples of the runtime's channel block "
            f"(matched_m8, the fair baseline on ORT CPU): ours ÷ matched_m8 ≤ 1.05 in "
            f"{within_m8}/{n_m8}."
        )
    return lines


def render(out: dict) -> str:
    cols = ["constrained", "constrained_matched", "naive", "ours_exact", "ours_segmented", "ours"]
    cols.append("authors")
    if any(
        "constrained_matched_m8" in c["variants"]
        for m in out["models"].values()
        for c in m.values()
    ):
        cols.insert(2, "constrained_matched_m8")
    lines = [
        f"# unconstrained export ({_runtime(out['backend'])}, batch {out.get('batch', 1)}, "
        "224×224, random init)",
        "",
        f"commit {commits(out)}; kept counts rounded to multiples of {out.get('multiple', 1)}",
        "",
        "Cells: gathers / gathered channels / latency × dense (paired, median of repeats). "
        "`ours`: each consumer's read timed on the backend; kept (non-zero) params, of stored "
        "where zero columns are stored; MACs. Matched constrained: same kept params "
        f"({out.get('matched_on', 'stored_params')}).",
        "",
        "| model | sparsity | "
        + " | ".join(cols)
        + " | kept | ours ÷ matched | ours ÷ matched_m8 |",
        "|---" * (len(cols) + 5) + "|",
    ]
    for name, cases in out["models"].items():
        for s, case in cases.items():
            v = case["variants"]
            cells = []
            for c in cols:
                if c not in v:
                    err = case["variants"].get(c, {}).get("error")
                    cells.append("—" if not err else "failed")
                    continue
                gmacs = f", {v[c]['macs'] / 1e9:.2f} GMAC" if "macs" in v[c] else ""
                kept, stored = v[c]["nonzero_params"] / 1e6, v[c]["stored_params"] / 1e6
                size = f"{kept:.2f}M" if stored - kept < 0.01 else f"{kept:.2f}M of {stored:.2f}M"
                cells.append(
                    f"{v[c]['gathers']} / {v[c]['gathered_channels']} / "
                    f"{v[c]['vs_dense']:.3f}× ({size}{gmacs})"
                )
            kept = (v["ours"].get("whole_check") or {}).get("kept", "—")
            lines.append(
                f"| {name} | {s} | " + " | ".join(cells) + f" | {kept} | {_vs_matched(v)} | "
                f"{_vs_matched(v, 'constrained_matched_m8')} |"
            )
    lines += ["", *_targets(out)]
    extra = [
        (name, s, case["variants"])
        for name, cases in out["models"].items()
        for s, case in cases.items()
        if "ours_pool" in case["variants"]
    ]
    if extra:
        lines += [
            "",
            "Pooled masks (consumers choose from a pool of (1-s)(1+pool) channels per group): "
            "input-column energy kept (accuracy proxy) and latency.",
            "",
            "| model | sparsity | energy constrained | energy ours | energy ours_pool "
            "| ours_pool × dense (params) | matched constrained × dense | pool ÷ matched |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, s, v in extra:
            p, m = v["ours_pool"], v["constrained_matched_pool"]
            lines.append(
                f"| {name} | {s} | {v['constrained']['mass_kept']:.3f} | "
                f"{v['ours']['mass_kept']:.3f} | {p['mass_kept']:.3f} | {p['vs_dense']:.3f}× "
                f"({p['stored_params'] / 1e6:.2f}M) | {m['vs_dense']:.3f}× | "
                f"{p['ms'] / m['ms']:.3f} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
