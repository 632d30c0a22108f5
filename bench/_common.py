"""What the bench scripts share: the commit id, side-by-side paired ratios, result files, CLI.

A bench compares models timed side by side in one run (``measure_side_by_side``), as ratios
paired per alternation round (``relative_latency``), repeated in shuffled orders; its JSON and
Markdown are written atomically, so an interrupted run leaves the last complete file behind.
"""

from __future__ import annotations

import argparse
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torchvision
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from fxprune.backends import (
    Backend,
    MeasureConfig,
    Measurement,
    get_backend,
    measure_side_by_side,
    relative_latency,
)
from fxprune.core.io import write_json, write_text

__all__ = [
    "MEASURE",
    "RESULTS",
    "argument_parser",
    "commit",
    "commits",
    "cpu_backend",
    "format_paired",
    "make_sensitive",
    "paired",
    "paired_ratios",
    "random_init",
    "rel_err",
    "write_results",
]

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
#: side-by-side measurement of whole models: every model runs at least 1.5 s per figure
MEASURE = MeasureConfig(warmup=5, repeats=30, min_seconds=1.5)


def commit() -> str:
    """``git rev-parse --short HEAD``, with ``-dirty`` when tracked code differs from it.

    Changes under ``bench/results`` do not count: a bench rewrites its own results while it
    runs. Empty outside a git checkout.
    """
    head = _git("rev-parse", "--short", "HEAD")
    changed = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results")
    return f"{head}-dirty" if head and changed else head


def _git(*args: str) -> str:
    """``git *args`` in the repository's root: its output, or "" where git fails."""
    try:
        run = subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT)
    except OSError:  # no git
        return ""
    return run.stdout.strip() if run.returncode == 0 else ""


def commits(out: Mapping) -> str:
    """The commit of the results, or of each case where cases were rerun at other commits.

    ``out["models"][name][case]["commit"]``, falling back to ``out["commit"]``.
    """
    per = {
        f"{n} {s}": c.get("commit", out.get("commit"))
        for n, cs in out["models"].items()
        for s, c in cs.items()
    }
    if len(set(per.values())) <= 1:
        return str(next(iter(per.values()), out.get("commit")))
    return "; ".join(
        f"{c} ({', '.join(k for k, v in per.items() if v == c)})"
        for c in dict.fromkeys(per.values())
    )


def paired_ratios(
    backend: Backend,
    variants: Mapping[str, nn.Module],
    x: torch.Tensor,
    repeats: int,
    config: MeasureConfig = MEASURE,
    *,
    reference: str = "dense",
    shuffle: bool = True,
) -> tuple[dict[str, list[float]], list[dict[str, Measurement]]]:
    """Each variant's latency / ``variants[reference]``, from ``repeats`` side-by-side runs.

    Variants that are the same module object are timed once. With ``shuffle`` every repeat
    times the distinct modules in a fresh random order (seeded): a module's place in the
    alternation and in memory should not decide a 5% comparison. Returns the ratios per
    repeat (paired per alternation round, :func:`fxprune.backends.relative_latency`) and
    every repeat's measurement per variant.
    """
    unique: list[nn.Module] = []
    for v in variants.values():
        if not any(v is u for u in unique):
            unique.append(v)
    ratios: dict[str, list[float]] = {k: [] for k in variants}
    rounds: list[dict[str, Measurement]] = []
    rng = np.random.default_rng(0)
    for _ in range(repeats):
        order = [unique[i] for i in rng.permutation(len(unique))] if shuffle else unique
        with torch.no_grad():
            meas = measure_side_by_side(backend, order, (x,), config, 1)
        by_module = {id(u): m for u, m in zip(order, meas, strict=True)}
        ref = by_module[id(variants[reference])]
        rounds.append({k: by_module[id(v)] for k, v in variants.items()})
        for k, m in rounds[-1].items():
            ratios[k].append(relative_latency(m, ref))
    return ratios, rounds


def paired(v: Mapping, a: str, b: str) -> np.ndarray:
    """Variant ``a`` / variant ``b`` per repeat (paired), or the one ratio of the medians.

    ``v`` maps a variant to its result, with ``vs_dense`` and ``vs_dense_runs`` (per repeat).
    """
    ra, rb = v[a].get("vs_dense_runs"), v[b].get("vs_dense_runs")
    if ra and len(ra) == len(rb):
        return np.asarray(ra) / np.asarray(rb)
    return np.asarray([v[a]["vs_dense"] / v[b]["vs_dense"]])


def format_paired(v: Mapping, a: str, b: str) -> str:
    """``a`` / ``b``: the median of per-repeat ratios and their range ("—" if one is missing)."""
    if a not in v or b not in v:
        return "—"
    r = paired(v, a, b)
    if r.size < 2:
        return f"{r[0]:.3f}"
    return f"{np.median(r):.3f} ({r.min():.3f}–{r.max():.3f})"


def write_results(path: Path, data: object, markdown: str | None = None) -> None:
    """Write ``data`` as JSON to ``path`` and ``markdown`` beside it (``.md``), each atomically."""
    write_json(path, data)
    if markdown is not None:
        write_text(path.with_suffix(".md"), markdown)


def argument_parser(
    doc: str | None,
    *,
    models: Sequence[str] | None = None,
    sparsity: Sequence[float] | None = None,
    out: Path | None = None,
) -> argparse.ArgumentParser:
    """A parser described by ``doc``'s first paragraph, with the flags most benches take.

    ``--models`` (names, default ``models``), ``--sparsity`` (floats, default ``sparsity``) and
    ``--out`` (a path, default ``out``) are added when their default is given.
    """
    p = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0] or None)
    if models is not None:
        p.add_argument("--models", nargs="*", default=list(models))
    if sparsity is not None:
        p.add_argument("--sparsity", nargs="*", type=float, default=list(sparsity))
    if out is not None:
        p.add_argument("--out", type=Path, default=out)
    return p


def cpu_backend(name: str = "ort") -> Backend:
    """The backend ``name`` on CPU: ONNX Runtime's CPU provider, or eager PyTorch."""
    return get_backend(name, **({"provider": "cpu"} if name == "ort" else {}))


def random_init(name: str) -> nn.Module:
    """The torchvision model ``name`` with random weights (seed 0), in eval mode."""
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None).eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b|."""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / (b.abs().max() + 1e-12))


def make_sensitive(
    model: nn.Module, example: torch.Tensor | None = None, seed: int = 0
) -> nn.Module:
    """Make a random-init model's output depend on every channel, in place.

    Fresh torchvision models have BN at identity, ConvNeXt layer scales at 1e-6 and ViT heads
    at zero, and deep random nets often lose the input entirely, which would let a channel
    mix-up pass the oracle comparison. So: zero heads get small random weights, layer scales
    become O(1), BatchNorm statistics are re-estimated on random data of ``example``'s shape
    (keeping activations normalised all the way down; without ``example`` they are randomised
    instead), and BN affines are randomised: the recipe the test suite applies to the models it checks (the
    tests import this one copy).
    """
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and not m.weight.any():
                m.weight.normal_(0.0, 0.02, generator=g)
                if m.bias is not None:
                    m.bias.normal_(0.0, 0.02, generator=g)
        for name, p in model.named_parameters():
            if name.endswith("layer_scale"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.5)
        if example is not None and bns:
            was_training = model.training
            momenta = [m.momentum for m in bns]
            for m in bns:
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the calibration batches
            model.eval()  # only the BNs collect statistics; aux heads, dropout stay in eval
            for m in bns:
                m.train()
            for _ in range(2):
                model(torch.randn((4, *example.shape[1:]), generator=g))
            for m, mom in zip(bns, momenta, strict=True):
                m.momentum = mom
            model.train(was_training)
        for m in bns:
            if m.affine:
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            if example is None:
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def progress_bar(console: Console) -> Progress:
    """The benches' rich progress bar: description, bar, done/total, elapsed."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


def inexact_pruned(analysis, plan) -> list[str]:
    """The inexact groups ``plan`` shrinks: there pruning is not masking, by design."""
    return sorted(
        g
        for g, kept in plan.kept.items()
        if analysis.group(g).inexact and len(kept) < analysis.group(g).size
    )


def exact_part(analysis, plan):
    """``plan`` with its inexact groups kept whole: what must equal the masking oracle."""
    from fxprune import Plan

    drop = set(inexact_pruned(analysis, plan))
    kept = {g: k for g, k in plan.kept.items() if g not in drop}
    return Plan(kept, plan.removed_blocks, plan.signature)
