"""Latency of a 1×1→3×3→1×1 conv unit at 56×56 over every channel count, raw and denoised.

Why: the solver must only be offered channel counts the runtime runs well, and the denoiser
must not erase the runtime's alignment steps. This measures the curve on the deployment
runtime (ONNX Runtime, batch 1), finds the alignment period, fits it, and writes
``bench/results/conv_curve.json`` and ``conv_curve.png``. Measurements go through the latency
cache, so a re-run only measures what changed.

    python -m bench.conv_curve [--start 32] [--stop 96] [--threads N] [--cache-dir DIR]
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch import nn

from bench._common import RESULTS, argument_parser, write_results
from fxprune.backends import (
    LatencyCache,
    MeasureConfig,
    Measurement,
    OnnxRuntimeBackend,
    UnstableMeasurementWarning,
)
from fxprune.latency import alignment_classes, candidate_counts, denoise

__all__ = ["conv_unit", "main"]

HW = 56


def conv_unit(c: int, outer: int | None = None) -> nn.Module:
    """Bottleneck-style unit: 1×1 (outer→c), 3×3 (c→c), 1×1 (c→outer), each + BN + ReLU."""
    outer = c if outer is None else outer

    def cbr(cin: int, cout: int, k: int) -> list[nn.Module]:
        return [
            nn.Conv2d(cin, cout, k, padding=k // 2, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
        ]

    torch.manual_seed(c)
    return nn.Sequential(*cbr(outer, c, 1), *cbr(c, c, 3), *cbr(c, outer, 1)).eval()


def _stable(value: dict) -> bool:
    # Unstable figures are re-measured on the next run rather than trusted from the cache.
    return bool(value.get("stable"))


def _plot(
    path: Path,
    counts: np.ndarray,
    raw: np.ndarray,
    p10: np.ndarray,
    p90: np.ndarray,
    fitted: np.ndarray,
    candidates: list[int],
    period: int,
) -> None:
    """Raw medians with their p10–p90 range, the fit (aligned counts marked), candidates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 5))
    ax.errorbar(counts, raw, yerr=[raw - p10, p90 - raw], fmt="o", ms=3, color="0.55", lw=0.8)
    ax.plot([], [], "o", ms=3, color="0.55", label="raw median (p10–p90)")
    ax.plot(counts, fitted, "-", color="tab:blue", lw=1, alpha=0.6)
    aligned = counts % period == 0
    ax.plot(counts[~aligned], fitted[~aligned], ".", color="tab:blue", label="denoised")
    label = f"denoised, multiple of {period}"
    ax.plot(counts[aligned], fitted[aligned], "s", color="tab:green", ms=6, label=label)
    for c in candidates:
        ax.axvline(c, color="tab:orange", lw=0.8, ls="--", alpha=0.7)
    ax.plot([], [], "--", color="tab:orange", label="candidate counts")
    ax.set_xlabel("channels c (1×1 → 3×3 → 1×1, 56×56, batch 1)")
    ax.set_ylabel("latency [ms]")
    ax.set_title(f"ONNX Runtime CPU: conv unit latency vs channels (period found: {period})")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Measure the curve, denoise it, write JSON and PNG, print a summary."""
    parser = argument_parser(__doc__)
    parser.add_argument("--start", type=int, default=32)
    parser.add_argument("--stop", type=int, default=96)
    parser.add_argument("--outer", type=int, default=None, help="fixed in/out channels")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    console = Console()
    # Unstable figures are flagged in the progress bar, the table and the JSON instead.
    warnings.simplefilter("ignore", UnstableMeasurementWarning)
    backend = OnnxRuntimeBackend(provider="cpu", threads=args.threads)
    config = MeasureConfig()
    cache = LatencyCache(args.cache_dir)
    identity = backend.identity()
    counts = np.arange(args.start, args.stop + 1)
    records: list[Measurement] = []
    wall: list[float] = []
    hits = 0
    t0 = time.perf_counter()
    columns = (
        TextColumn("[bold]c={task.fields[c]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[last]}"),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("measure", total=len(counts), c="-", last="")
        for c in counts.tolist():
            progress.update(task, c=c)
            key = {
                "op": "conv_unit_1x1_3x3_1x1",
                "hw": [HW, HW],
                "batch": 1,
                "c": c,
                "outer": args.outer if args.outer is not None else c,
                "dtype": "float32",
                "measure": asdict(config),
                "backend": identity,
            }
            cached = cache.get(key)
            was_cached = cached is not None and _stable(cached)
            start = time.perf_counter()

            def run(c: int = c) -> dict:
                x = torch.randn(1, args.outer or c, HW, HW)
                return backend.measure(conv_unit(c, args.outer), (x,), config).to_dict()

            m = Measurement.from_dict(cache.get_or_measure(key, run, accept=_stable))
            wall.append(time.perf_counter() - start)
            hits += was_cached
            records.append(m)
            flag = "" if m.stable else " [red]unstable[/red]"
            progress.update(task, advance=1, last=f"{m.median_ms:.3f} ms{flag}")
    elapsed = time.perf_counter() - t0

    raw = np.array([m.median_ms for m in records])
    p10 = np.array([m.p10_ms for m in records])
    p90 = np.array([m.p90_ms for m in records])
    alignment = alignment_classes(counts, raw)
    t_fit = time.perf_counter()
    curve = denoise(counts, raw, alignment.period)
    t_fit = time.perf_counter() - t_fit
    candidates = [c for c in candidate_counts(int(counts[-1]), alignment.period) if c >= counts[0]]

    result = {
        "unit": "1x1->3x3->1x1 conv+BN+ReLU, 56x56, batch 1",
        "outer": args.outer,
        "backend": identity,
        "measure_config": asdict(config),
        "period": alignment.period,
        "evidence": {
            str(p): {"support": s, "fraction_faster": f, "median_log_gain": g}
            for p, (s, f, g) in alignment.evidence.items()
        },
        "candidate_counts": candidates,
        "counts": counts.tolist(),
        "raw_median_ms": raw.tolist(),
        "raw_p10_ms": p10.tolist(),
        "raw_p90_ms": p90.tolist(),
        "stable": [m.stable for m in records],
        "denoised_ms": curve.fitted.tolist(),
        "wall_s_per_count": wall,
        "elapsed_s": elapsed,
        "denoise_s": t_fit,
        "cache_hits": hits,
    }
    write_results(args.out / "conv_curve.json", result)
    png = args.out / "conv_curve.png"
    _plot(png, counts, raw, p10, p90, curve.fitted, candidates, alignment.period)

    table = Table(title=f"conv unit, period found: {alignment.period}")
    for col in ("c", "raw ms", "p10–p90", "denoised ms", "stable"):
        table.add_column(col, justify="right")
    show = {48, 56, 63, 64, 65, 72, 80, *candidates}
    for i, c in enumerate(counts.tolist()):
        if c in show:
            stable = "yes" if records[i].stable else "[red]no"
            spread = f"{p10[i]:.3f}–{p90[i]:.3f}"
            table.add_row(str(c), f"{raw[i]:.3f}", spread, f"{curve.fitted[i]:.3f}", stable)
    console.print(table)
    console.print(
        f"evidence per period (support, fraction faster, median log gain): {alignment.evidence}"
    )
    console.print(
        f"{len(counts)} counts in {elapsed:.1f} s ({hits} from cache), denoise {t_fit:.2f} s, "
        f"{sum(not m.stable for m in records)} unstable; wrote {args.out}/conv_curve.json and .png"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
