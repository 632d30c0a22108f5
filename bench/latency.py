"""Latency tables and end-to-end prediction on ResNet-50 and MobileNetV2 (ONNX Runtime CPU).

For each model at 224×224, batch 1: build the tables cold (a fresh temporary cache) and warm
(the same cache again), draw random sub-networks whose kept counts lie on the candidate grid
(and random removed blocks), measure each whole on ONNX Runtime side by side with the dense
model (alternating rounds; each figure is the paired pruned/dense ratio, median over rounds,
times the dense model's median over the whole run; raw figures kept), calibrate our model and the FLOPs-proportional one on a few of them, and report
|predicted / measured − 1| on the others.
Writes ``bench/results/latency.json``, ``latency.md`` and plots.

    python -m bench.latency [--models resnet50 mobilenet_v2] [--eval 20] [--calib 5]

(from the repository root).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

import fxprune
from bench._common import RESULTS, argument_parser, random_init, write_results
from fxprune.backends import (
    LatencyCache,
    OnnxRuntimeBackend,
    UnstableMeasurementWarning,
    measure_side_by_side,
    relative_latency,
)
from fxprune.latency.in_model import in_model_factors
from fxprune.latency.plots import plot_layer_curve, plot_layer_surface, plot_predictions
from fxprune.latency.predictor import LatencyModel, MacsModel, relative_errors
from fxprune.latency.sampling import random_aligned_plan
from fxprune.latency.tables import LatencyConfig, annotate_latency


def _stats(errors: np.ndarray) -> dict[str, float]:
    return {
        "median": float(np.median(errors)),
        "p90": float(np.percentile(errors, 90)),
        "max": float(np.max(errors)),
    }


def _pick_layer(tables: Any, axes: str) -> Any:
    """The costliest layer with a table of the given shape (the steps show above the noise)."""
    cands = [t for t in tables.layers.values() if t.axes == axes and len(t.sweep_counts)]
    return max(cands, key=lambda t: t.full_ms, default=None)


def run_model(name: str, args: argparse.Namespace, console: Console) -> dict[str, Any]:
    model = random_init(name)
    x = torch.randn(1, 3, args.size, args.size)
    analysis = fxprune.analyze(model, x)
    backend = OnnxRuntimeBackend(provider="cpu", threads=args.threads)
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="fxprune-latency-") as tmp:
        cache = LatencyCache(tmp)
        console.print(f"[bold]{name}[/bold]: building tables cold (cache {tmp})")
        tables = annotate_latency(analysis, backend, cache=cache, config=LatencyConfig())
        cold_s = tables.build_s
        load.append(os.getloadavg()[0])
        warm_analysis = fxprune.analyze(model, x)
        warm = annotate_latency(
            warm_analysis, backend, cache=cache, config=LatencyConfig(progress=False)
        )
        warm_s, warm_measured = warm.build_s, warm.measured
    console.print(
        f"  cold {cold_s:.1f} s ({tables.points} points, {tables.measured} measured), "
        f"warm {warm_s:.2f} s ({warm_measured} measured); dense {tables.dense_ms:.2f} ms, "
        f"Σ tables {tables.full_sum():.2f} ms, constant {tables.constant_ms:.2f} ms"
    )

    lm = LatencyModel(analysis, tables, backend)
    # every whole-model figure runs at least min_seconds per model: with 30 runs only (0.6 s for
    # a 20 ms sub-network) a single burst of host interference moves a figure by 10-20%
    measure = replace(lm.measure_config, min_seconds=args.min_seconds)
    calib = [
        random_aligned_plan(analysis, tables.group_grids, s, block_prob=args.block_prob)
        for s in range(args.calib)
    ]
    evals = [
        random_aligned_plan(analysis, tables.group_grids, 1000 + s, block_prob=args.block_prob)
        for s in range(args.eval)
    ]
    # Each sub-network is timed side by side with the dense model (alternating rounds), and its
    # figure is the paired ratio (relative_latency) times the dense model's median over all
    # sub-networks: the host drifts by ±10–30% over minutes here, and by a few % between rounds,
    # which would otherwise be charged to the predictor. Raw figures too.
    raw: list[float] = []
    ratios: list[float] = []  # paired per alternation round (relative_latency)
    dense_rounds: list[float] = []
    stable: list[bool] = []
    t0 = time.perf_counter()
    for i, plan in enumerate(calib + evals):
        m, d = measure_side_by_side(
            backend, [fxprune.prune(analysis, plan), analysis.gm], (x,), measure, 1
        )
        raw.append(m.median_ms)
        ratios.append(relative_latency(m, d))
        dense_rounds.append(d.median_ms)
        stable.append(m.stable and d.stable)
        console.print(
            f"  {'calib' if i < len(calib) else 'eval'} {i:2d}: measured {m.median_ms:7.2f} ms"
            f" (dense beside it {d.median_ms:6.2f}), tables {lm.predict(plan):7.2f}, "
            f"blocks removed {len(plan.removed_blocks)}"
        )
    measure_s = time.perf_counter() - t0
    load.append(os.getloadavg()[0])
    dense_ref = float(np.median(dense_rounds))
    measured = [q * dense_ref for q in ratios]
    m_cal, m_eval = measured[: len(calib)], np.asarray(measured[len(calib) :])
    raw_eval = np.asarray(raw[len(calib) :])
    macs = MacsModel(analysis, dense_ref)
    dense_plan = fxprune.Plan.empty(analysis)

    uncal = [lm.predict(p) for p in evals]
    prop = [macs.predict(p) for p in evals]
    cal_ours = lm.calibrate([*calib, dense_plan], [*m_cal, dense_ref], include_dense=False)
    cal_macs = macs.calibrate(calib, m_cal)
    ours = [lm.predict(p) for p in evals]
    lm_pl = LatencyModel(analysis, tables, backend)
    cal_pl = lm_pl.calibrate(
        [*calib, dense_plan], [*m_cal, dense_ref], include_dense=False, per_layer=True
    )
    ours_pl = [lm_pl.predict(p) for p in evals]
    flops = [macs.predict(p) for p in evals]
    # the same fits on the raw figures (no drift correction), for comparison
    lm_raw = LatencyModel(analysis, tables, backend)
    lm_raw.calibrate(calib, raw[: len(calib)])
    macs_raw = MacsModel(analysis, tables.dense_ms)
    macs_raw.calibrate(calib, raw[: len(calib)])
    # per-layer scales from one profiled run of the dense model (fxprune.latency.in_model)
    lm_im = LatencyModel(analysis, tables, backend)
    factors = in_model_factors(analysis, tables, backend)
    lm_im.set_scales(factors)
    uncal_im = [lm_im.predict(p) for p in evals]
    lm_im.calibrate([*calib, dense_plan], [*m_cal, dense_ref], include_dense=False)
    ours_im = [lm_im.predict(p) for p in evals]
    off_grid = sum(len(lm.off_grid(p)) for p in calib + evals)

    out = Path(args.out)
    surface = _pick_layer(tables, "in,out")
    curve_layer = surface or _pick_layer(tables, "channel")
    if surface is not None:
        plot_layer_surface(surface, out / f"latency_{name}_surface.png")
    if curve_layer is not None:
        plot_layer_curve(curve_layer, out / f"latency_{name}_curve.png")
    plot_predictions(
        m_eval,
        {
            "tables (a·Σ+b)": ours,
            "tables (a·Σ+c·layers+b)": ours_pl,
            "FLOPs (a·MACs+b)": flops,
        },
        out / f"latency_{name}_pred.png",
        title=f"{name}, ORT CPU, 224², batch 1: {len(evals)} random aligned sub-networks",
    )
    layer_info = {
        n: {
            "unit": t.unit,
            "axes": t.axes,
            "period_in": t.period_in,
            "period_out": t.period_out,
            "in_grid": list(t.in_grid),
            "out_grid": list(t.out_grid),
            "full_ms": t.full_ms,
            "unstable_points": t.unstable_points,
        }
        for n, t in tables.layers.items()
    }
    return {
        "model": name,
        "dense_ms": dense_ref,
        "dense_ms_tables": tables.dense_ms,
        "table_sum_full_ms": tables.full_sum(),
        "constant_ms": tables.constant_ms,
        "cold_build_s": cold_s,
        "warm_build_s": warm_s,
        "points": tables.points,
        "measured_cold": tables.measured,
        "measured_warm": warm_measured,
        "group_periods": tables.group_periods,
        "group_grids": {k: list(v) for k, v in tables.group_grids.items()},
        "calibration": {
            "tables": {"a": cal_ours.a, "b": cal_ours.b, "fit_errors": list(cal_ours.errors_after)},
            "in_model": {"a": lm_im.a, "b": lm_im.b},
            "tables_per_layer": {
                "a": cal_pl.a,
                "per_layer_ms": cal_pl.per_layer,
                "b": cal_pl.b,
                "fit_errors": list(cal_pl.errors_after),
            },
            "flops": {"a": cal_macs.a, "b": cal_macs.b, "fit_errors": list(cal_macs.errors_after)},
        },
        "errors": {
            "tables_calibrated": _stats(relative_errors(ours, m_eval)),
            "tables_calibrated_per_layer": _stats(relative_errors(ours_pl, m_eval)),
            "tables_uncalibrated": _stats(relative_errors(uncal, m_eval)),
            "flops_calibrated": _stats(relative_errors(flops, m_eval)),
            "flops_proportional": _stats(relative_errors(prop, m_eval)),
            "in_model_uncalibrated": _stats(relative_errors(uncal_im, m_eval)),
            "in_model_calibrated": _stats(relative_errors(ours_im, m_eval)),
            "raw_tables_calibrated": _stats(
                relative_errors([lm_raw.predict(p) for p in evals], raw_eval)
            ),
            "raw_flops_calibrated": _stats(
                relative_errors([macs_raw.predict(p) for p in evals], raw_eval)
            ),
        },
        "dense_beside_ms": dense_rounds,
        "in_model_factors": factors,
        "dense_drift": float(np.max(dense_rounds) / np.min(dense_rounds) - 1),
        "eval": [
            {
                "measured_ms": float(mm),
                "raw_ms": float(rr),
                "tables_ms": float(o),
                "tables_per_layer_ms": float(q),
                "tables_uncal_ms": float(u),
                "flops_ms": float(f),
                "macs": macs.macs(p),
                "removed_blocks": len(p.removed_blocks),
                "stable": s,
            }
            for mm, rr, o, q, u, f, p, s in zip(
                m_eval,
                raw_eval,
                ours,
                ours_pl,
                uncal,
                flops,
                evals,
                stable[len(calib) :],
                strict=True,
            )
        ],
        "calib_measured_ms": m_cal,
        "unstable_whole_measurements": int(sum(not s for s in stable)),
        "off_grid_layers": off_grid,
        "measure_s": measure_s,
        "loadavg_1min": load,
        "layers": layer_info,
        "plots": {
            "surface": surface.node if surface else None,
            "curve": curve_layer.node if curve_layer else None,
        },
    }


def _markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    def pair(e: dict[str, float]) -> str:
        return f"{e['median']:.1%} / {e['p90']:.1%}"

    lines = [
        f"Latency tables, ONNX Runtime {meta['ort']} CPU ({meta['threads']} threads), {meta['size']}², "
        f"batch 1, {meta['cpu']}; {meta['eval']} random aligned sub-networks per model, "
        f"calibrated on {meta['calib']} others. Errors: median / p90 of |pred/meas − 1|, with "
        f"every sub-network timed side by side with the dense model (≥ {meta['min_seconds']} s each) "
        "and taken as the paired pruned/dense ratio times the dense median; the last two "
        "columns use the raw figures.",
        "",
        "| model | dense ms (drift) | cold build s | warm build s | points "
        "| in-model tables a·Σ+b | in-model tables uncalibrated | tables a·Σ+c·n+b "
        "| tables a·Σ+b | tables uncalibrated | FLOPs a·MACs+b | FLOPs proportional "
        "| raw: tables a·Σ+b | raw: FLOPs a·MACs+b |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        e = r["errors"]
        lines.append(
            f"| {r['model']} | {r['dense_ms']:.2f} ({r['dense_drift']:.0%}) | "
            f"{r['cold_build_s']:.1f} | "
            f"{r['warm_build_s']:.2f} | {r['points']} | "
            f"{pair(e['in_model_calibrated'])} | {pair(e['in_model_uncalibrated'])} | "
            f"{pair(e['tables_calibrated_per_layer'])} | {pair(e['tables_calibrated'])} | "
            f"{pair(e['tables_uncalibrated'])} | {pair(e['flops_calibrated'])} | "
            f"{pair(e['flops_proportional'])} | {pair(e['raw_tables_calibrated'])} | "
            f"{pair(e['raw_flops_calibrated'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("--models", nargs="+", default=["resnet50", "mobilenet_v2"])
    parser.add_argument("--eval", type=int, default=20)
    parser.add_argument("--calib", type=int, default=5)
    parser.add_argument("--block-prob", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--size", type=int, default=224, help="input resolution")
    parser.add_argument(
        "--min-seconds", type=float, default=2.0, help="least time each whole model runs per figure"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore", UnstableMeasurementWarning)  # counted in the JSON instead
    console = Console()
    args.out.mkdir(parents=True, exist_ok=True)
    backend = OnnxRuntimeBackend(provider="cpu", threads=args.threads)
    ident = backend.identity()
    meta = {
        "ort": ident["runtime_version"],
        "threads": backend.threads,
        "cpu": f"{ident['cpu_model']} ({ident['cpu_isa']})",
        "eval": args.eval,
        "calib": args.calib,
        "size": args.size,
        "min_seconds": args.min_seconds,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    results = [run_model(name, args, console) for name in args.models]
    md = _markdown(results, meta)
    write_results(
        args.out / "latency.json", {"meta": meta, "backend": ident, "results": results}, md
    )
    table = Table(title="latency prediction (median / p90 of |pred/meas − 1|)")
    for col in (
        "model",
        "cold s",
        "warm s",
        "in-model cal",
        "tables cal/layer",
        "tables cal",
        "tables uncal",
        "FLOPs cal",
        "FLOPs prop",
    ):
        table.add_column(col, justify="right")
    for r in results:
        e = r["errors"]
        table.add_row(
            r["model"],
            f"{r['cold_build_s']:.1f}",
            f"{r['warm_build_s']:.2f}",
            *(
                f"{e[k]['median']:.1%} / {e[k]['p90']:.1%}"
                for k in (
                    "in_model_calibrated",
                    "tables_calibrated_per_layer",
                    "tables_calibrated",
                    "tables_uncalibrated",
                    "flops_calibrated",
                    "flops_proportional",
                )
            ),
        )
    console.print(table)
    console.print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
