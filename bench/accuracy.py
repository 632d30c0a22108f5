"""Accuracy at a measured speed: fxprune against uniform width and Torch-Pruning on real data.

scikit-learn's digits (upsampled to 32×32, :mod:`bench._digits`; nothing downloads) train a
teacher of each architecture per seed. At each budget (a fraction of the dense model's ONNX
Runtime CPU latency at batch 8, measured side by side) the teacher is pruned by:

* **fxprune** — ``compile`` with first-order Taylor importance on 8 calibration batches (and
  whatever objective options ``--variants`` name, for the study);
* **unconstrained** — the same with ``UnconstrainedConfig()`` (UCPE);
* **uniform** — every group keeps the same fraction (L2 magnitude), the fraction bisected until
  its measured latency matches fxprune's within ``--match`` (2 %);
* **torch_pruning** — ``torch_pruning.MetaPruner`` with its ``TaylorImportance`` (its defaults:
  per-group mean normalisation, global ranking off, one ratio for every layer, the head
  ignored), the ratio bisected the same way.

Every pruned model is evaluated as delivered, after re-estimating its BatchNorm statistics on
the same 8 batches, and after identical fine-tuning (``fxprune.finetune``: the same epochs,
schedule, seed and distillation from the teacher): the full schedule (``--epochs``) and, from
the same start, a short one (``--short-epochs``): after the full one every plan is near the
teacher's ceiling on digits, the short one shows how much each plan still needs. Mean and spread
are over seeds.

The UPSCALE comparison prunes each teacher post-training (no fine-tuning) by L2 magnitude, with
unconstrained masks (each consumer its own best inputs) and with constrained ones (every
consumer of a tensor the same channels): at equal per-layer sparsity, and at equal parameters
(unconstrained masks keep more of them at one sparsity), each side at its own sparsity and the
other's sparsity bisected until the parameter counts match.

Stages (``--stage``): ``teachers`` (train, no timing), ``prune`` (all timing happens here: run
it on a quiet machine; it also adds the UPSCALE rows a seed lacks), ``upscale`` (redo the
UPSCALE rows, no timing), ``finetune`` (no timing), ``report``; ``all`` runs teachers, prune,
finetune and report in order (UPSCALE rows a seed already has are kept as they are: rows from
before the equal-parameter comparison lack it and are left out of that table until redone).
Teachers, pruned models and measurements are kept in ``--work`` so a stage can be re-run alone;
``prune`` adds to a kept case only the methods it lacks (``--redo``: all of them, afresh).
Writes ``bench/results/accuracy.json`` / ``.md`` and ``accuracy.png``.

``--train-per-class N`` is the low-data split (N training images per class, every other image
tests): on the 1200-image split every method fine-tunes to within a point of the teacher, so a
one-point difference cannot show; with few training images the teachers, and the pruned
models fine-tuned on the same images, stay below that ceiling. Its work directory and results
carry ``_n{N}`` (``accuracy_n{N}.json``).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from bench._common import MEASURE, RESULTS, argument_parser, commit, cpu_backend, write_results
from bench._digits import ARCHS, Loader, digits, make_arch
from fxprune.backends import measure_side_by_side
from fxprune.core.io import write_json

logger = logging.getLogger("bench.accuracy")

BUDGETS = [0.5, 0.3]
SEEDS = [0, 1, 2]
METHODS = ["fxprune", "unconstrained", "uniform", "torch_pruning"]
#: methods besides METHODS that --methods may name
EXTRA_METHODS = ["fxprune_progressive"]
BATCH = 8  # the latency batch
CALIB_BATCHES = 8
TEACHER_EPOCHS = 15
EPOCHS = 8
SHORT_EPOCHS = 2  # the short fine-tuning beside the full one (0: none)
MATCH = 0.02
UPSCALE_SPARSITIES = [0.3, 0.5]
#: the objective options the study compares (CompileConfig fields)
VARIANTS: dict[str, dict] = {
    "fxprune": {},
    "fxprune_mean": {"objective": fxprune.ObjectiveConfig(normalize="mean")},
    "fxprune_noblocks": {"allow_block_removal": False},
    "fxprune_magnitude": {"objective": fxprune.ObjectiveConfig(importance="magnitude")},
    "fxprune_minkeep": {"objective": fxprune.ObjectiveConfig(min_keep=0.25)},
    "fxprune_mean_minkeep": {"objective": fxprune.ObjectiveConfig(normalize="mean", min_keep=0.25)},
}
#: progressive pruning (``compile_progressively``): steps and the epochs between them; the
#: final model gets the same fine-tuning as every other, so it has trained this much more
PROGRESSIVE = {"steps": 3, "epochs_between": 2}


def _x() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(BATCH, 1, 32, 32)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i : i + 256]).argmax(1) for i in range(0, len(y), 256)])
    return float((pred == y).float().mean())


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def widths(model: nn.Module) -> dict[str, int]:
    """Output channels of every conv, by module path with ``.`` and ``_`` made the same."""
    return {
        n.replace(".", "_"): m.out_channels
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
    }


def plan_stats(pruned: nn.Module, dense: nn.Module) -> dict[str, float]:
    """What a plan looks like: kept width fractions of the convs still there, convs gone."""
    d, p = widths(dense), widths(pruned)
    fr = np.array([p[k] / d[k] for k in d if k in p])
    return {
        "min_width": float(fr.min()),
        "mean_width": float(fr.mean()),
        "std_width": float(fr.std()),
        "convs_removed": len([k for k in d if k not in p]),
        "params": params(pruned),
    }


# -- teachers -----------------------------------------------------------------------------


def teacher_path(work: Path, arch: str, seed: int, epochs: int) -> Path:
    return work / f"teacher_{arch}_s{seed}_e{epochs}.pt"


def train_teacher(arch: str, seed: int, data, epochs: int, work: Path) -> nn.Module:
    path = teacher_path(work, arch, seed, epochs)
    model = make_arch(arch, seed)
    if path.exists():
        model.load_state_dict(torch.load(path))
        return model.eval()
    xtr, ytr, xte, yte = data
    start = time.perf_counter()
    cfg = fxprune.FinetuneConfig(epochs=epochs, lr=0.1, seed=seed, progress=False)
    fxprune.finetune(model, Loader(xtr, ytr, 64, train=True), teacher=None, config=cfg)
    logger.info(
        "teacher %s seed %d: %.1f %% test in %.0f s",
        arch,
        seed,
        100 * accuracy(model, xte, yte),
        time.perf_counter() - start,
    )
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    return model.eval()


# -- pruning (every timing of the bench) ------------------------------------------------


def _ratio(backend, model: nn.Module, dense: nn.Module, x: torch.Tensor) -> float:
    p, d = measure_side_by_side(backend, [model, dense], (x,), MEASURE, 1)
    return p.median_ms / d.median_ms


def bisect(make, target: float, backend, dense, x, lo: float, hi: float, steps: int = 8):
    """Search ``p`` in ``[lo, hi]`` (latency falls as ``p`` grows) for a model whose measured
    ratio is within :data:`MATCH` of ``target``; the closest trial when none is."""
    trials, best = [], None
    for _ in range(steps):
        p = (lo + hi) / 2
        model = make(p)
        r = _ratio(backend, model, dense, x)
        trials.append({"p": p, "ratio": r})
        if best is None or abs(r / target - 1) < abs(best[1] / target - 1):
            best = (model, r, p)
        if abs(r / target - 1) <= MATCH:
            break
        lo, hi = (p, hi) if r > target else (lo, p)
    return best[0], {"ratio": best[1], "p": best[2], "trials": trials}


def torch_pruning(teacher: nn.Module, x: torch.Tensor, ratio: float, calib) -> nn.Module:
    """Torch-Pruning's Taylor pruning of a copy at ``ratio``, gradients from ``calib``."""
    import torch_pruning as tp

    m = copy.deepcopy(teacher).eval()
    pruner = tp.pruner.MetaPruner(
        m, x, importance=tp.importance.TaylorImportance(), pruning_ratio=ratio,
        ignored_layers=[m.fc],
    )  # fmt: skip
    m.zero_grad()
    for i, (xb, yb) in enumerate(calib):
        if i == CALIB_BATCHES:
            break
        F.cross_entropy(m(xb), yb).backward()
    pruner.step()
    m.zero_grad(set_to_none=True)
    return m.eval()


def _compile_config(work: Path, **options) -> fxprune.CompileConfig:
    """compile's settings here: these nets are narrow (16–128 channels), so counts below the
    16-channel layout block are offered (``layout_floor=False``) — else 0.3 is out of reach."""
    latency = fxprune.LatencyConfig(layout_floor=False, progress=False)
    return fxprune.CompileConfig(
        measure=MEASURE, cache=work / "latency", latency=latency, progress=False, **options
    )


def compile_teacher(teacher, budget: float, calib, backend, config) -> fxprune.CompileResult:
    """``fxprune.compile`` as this bench runs it: Taylor importance on the calibration
    batches, at the latency batch."""
    return fxprune.compile(
        teacher, budget, example_inputs=_x(), data=calib, loss_fn=F.cross_entropy,
        max_batches=CALIB_BATCHES, backend=backend, config=config,
    )  # fmt: skip


def _progressive(teacher, budget, x, train, work, backend, seed):
    schedule = fxprune.ProgressiveConfig(
        steps=PROGRESSIVE["steps"],
        finetune=fxprune.FinetuneConfig(
            epochs=PROGRESSIVE["epochs_between"], lr=0.02, seed=seed, progress=False
        ),
    )
    return fxprune.compile_progressively(
        teacher, budget, example_inputs=x, data=train, max_batches=CALIB_BATCHES,
        backend=backend, config=_compile_config(work), schedule=schedule,
    )  # fmt: skip


def prune_case(
    teacher, arch, seed, budget, calib, methods, variants, work, backend, train, case=None
):
    """Every method's pruned model at ``budget`` (saved in ``work``) and its measured ratio.

    ``case``: a kept case to add to (its methods are kept; the baselines match the latency of
    its fxprune model unless fxprune is pruned again)."""
    x = _x()
    case = case or {"arch": arch, "seed": seed, "budget": budget, "methods": {}}
    dense_gm = fxprune.analyze(teacher, x).gm

    def keep(name, model, info):
        torch.save(model, work / f"pruned_{arch}_s{seed}_b{budget}_{name}.pt")
        case["methods"][name] = {**info, **plan_stats(model, teacher)}
        logger.info("%s s%d %.2f %s: ratio %.3f", arch, seed, budget, name, info["ratio"])

    for name in variants:
        start = time.perf_counter()
        res = compile_teacher(
            teacher, budget, calib, backend, _compile_config(work, **VARIANTS[name])
        )
        keep(name, res.model, {
            "ratio": _ratio(backend, res.model, dense_gm, x),
            "compile_ratio": res.summary()["measured_ms"] / res.summary()["dense_ms"],
            "importance_method": res.importance_method, "removed_blocks": len(res.plan.removed_blocks),
            "rounds": [r.to_dict() for r in res.rounds],  # to replay a plan far from its budget
            "seconds": time.perf_counter() - start,
        })  # fmt: skip
    if "fxprune_progressive" in methods:
        start = time.perf_counter()
        res = _progressive(teacher, budget, x, train, work, backend, seed)
        keep("fxprune_progressive", res.model, {
            "ratio": _ratio(backend, res.model, dense_gm, x), "compile_ratio": res.ratio,
            "progressive": res.summary(), "seconds": time.perf_counter() - start,
        })  # fmt: skip
    target = case["methods"]["fxprune"]["ratio"]
    if "unconstrained" in methods:
        config = _compile_config(work, unconstrained=fxprune.UnconstrainedConfig())
        res = compile_teacher(teacher, budget, calib, backend, config)
        keep("unconstrained", res.model, {"ratio": _ratio(backend, res.model, dense_gm, x)})
    if "uniform" in methods:
        analysis = fxprune.analyze(teacher, x)

        def uniform(p):
            return fxprune.prune(analysis, fxprune.uniform_plan(analysis, 1 - p, multiple=1))

        model, info = bisect(uniform, target, backend, dense_gm, x, 0.0, 0.95)
        keep("uniform", model, info)
    if "torch_pruning" in methods:

        def tp(p):
            return torch_pruning(teacher, x, p, calib)

        model, info = bisect(tp, target, backend, dense_gm, x, 0.0, 0.95)
        keep("torch_pruning", model, info)
    return case


def _masked(analysis, sparsity: float, pool: float | None):
    """The teacher pruned post-training with per-layer L2 input masks (``pool=0``: constrained)."""
    masks = fxprune.magnitude_masks(analysis, sparsity, pool=pool)
    return fxprune.prune(analysis, fxprune.unconstrained_plan(analysis, masks)), masks


def _post_training(model, masks, sparsity, data, calib) -> dict:
    """Accuracy as pruned and after re-estimating BatchNorm statistics, with its size."""
    _, _, xte, yte = data
    row = {"sparsity": sparsity, "accuracy": accuracy(model, xte, yte), "params": params(model)}
    fxprune.recalibrate_norms(model, calib, max_batches=CALIB_BATCHES)
    row["accuracy_recalibrated"] = accuracy(model, xte, yte)
    row["inputs_kept"] = sum(int(np.sum(m)) for m in masks.values())
    return row


def _at_params(analysis, pool, target: int, steps: int = 14):
    """The sparsity whose pruned model's parameter count is nearest ``target`` (bisected)."""
    lo, hi, best = 0.0, 0.95, None
    for _ in range(steps):
        s = (lo + hi) / 2
        model, masks = _masked(analysis, s, pool)
        n = params(model)
        if best is None or abs(n - target) < abs(best[2] - target):
            best = (model, masks, n, s)
        if n > target:
            lo = s
        else:
            hi = s
    return best[0], best[1], best[3]


def upscale_case(teacher, arch, seed, data, calib, sparsities) -> list[dict]:
    """UPSCALE's post-training comparison: unconstrained vs constrained masks, no training.

    At equal per-layer sparsity unconstrained masks keep more parameters (a tensor's producer
    keeps the union of what its consumers read), so each side is also compared at the other's
    parameter count: the other's sparsity bisected until the counts match.
    """
    analysis = fxprune.analyze(teacher, _x())
    rows = []
    for s in sparsities:
        row: dict = {"arch": arch, "seed": seed, "sparsity": s}
        for name, pool in (("unconstrained", None), ("constrained", 0.0)):
            row[name] = _post_training(*_masked(analysis, s, pool), s, data, calib)
        for name, pool, other in (
            ("constrained_at_unconstrained_params", 0.0, "unconstrained"),
            ("unconstrained_at_constrained_params", None, "constrained"),
        ):
            model, masks, s_eq = _at_params(analysis, pool, row[other]["params"])
            row[name] = _post_training(model, masks, s_eq, data, calib)
        rows.append(row)
    return rows


# -- fine-tuning (no timing) --------------------------------------------------------------


def finetune_case(case, teacher, data, calib, work, epochs: int, short: int) -> None:
    """Fine-tune each pruned model of ``case`` for ``epochs`` and, from the same start, for
    ``short`` epochs (a whole one-cycle schedule each): after a long schedule on digits every
    plan reaches the teacher's ceiling, the short one shows how far from it each plan starts."""
    xtr, ytr, xte, yte = data
    arch, seed, budget = case["arch"], case["seed"], case["budget"]
    for name, m in case["methods"].items():
        path = work / f"pruned_{arch}_s{seed}_b{budget}_{name}.pt"
        for key, n in (("finetuned", epochs), ("finetuned_short", short)):
            if key in m or n <= 0:
                continue
            model = torch.load(path, weights_only=False)
            first = "recalibrated" not in m  # the same figures for every schedule
            if first:
                m["delivered"] = accuracy(model, xte, yte)
            fxprune.recalibrate_norms(model, calib, max_batches=CALIB_BATCHES)
            if first:
                m["recalibrated"] = accuracy(model, xte, yte)
            cfg = fxprune.FinetuneConfig(epochs=n, lr=0.05, seed=seed, progress=False)
            start = time.perf_counter()
            fxprune.finetune(model, Loader(xtr, ytr, 64, train=True), teacher=teacher, config=cfg)
            m[key] = accuracy(model, xte, yte)
            m[f"{key}_epochs"] = n
            m[f"{key}_seconds"] = time.perf_counter() - start
            logger.info(
                "%s s%d %.2f %s: %.1f → %.1f → %.1f %% (%d epochs)", arch, seed, budget, name,
                100 * m["delivered"], 100 * m["recalibrated"], 100 * m[key], n,
            )  # fmt: skip


# -- report -------------------------------------------------------------------------------


def _mean_sd(values) -> str:
    v = 100 * np.asarray(values, float)
    return f"{v.mean():.1f} ± {v.std(ddof=1) if len(v) > 1 else 0:.1f}"


def _teachers(out: dict) -> dict[str, list[float]]:
    by: dict[str, list[float]] = {}
    for key, acc in out["teachers"].items():
        by.setdefault(key.split("/")[0], []).append(acc)
    return by


def _paired(
    out: dict, against: str = "torch_pruning", key: str = "finetuned", what: str = "Fine-tuned"
) -> list[str]:
    """Per arch and budget, each fxprune variant's ``key`` accuracy minus ``against``'s,
    paired by seed (the same teacher): mean ± sd of the differences, in points."""
    diffs: dict = {}
    for c in out["cases"]:
        base = c["methods"].get(against, {}).get(key)
        if base is None:
            continue
        for name, m in c["methods"].items():
            if name != against and key in m:
                cell = (c["arch"], c["budget"], name)
                diffs.setdefault(cell, []).append(100 * (m[key] - base))
    if not diffs:
        return []
    lines = ["", f"## {what} accuracy minus {against}'s, paired by seed (points)", "",
             "| arch | budget | method | mean ± sd | per seed |", "|---|---|---|---|---|"]  # fmt: skip
    for (arch, budget, name), d in sorted(diffs.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        sd = np.std(d, ddof=1) if len(d) > 1 else 0.0
        lines.append(
            f"| {arch} | {budget} | {name} | {np.mean(d):+.1f} ± {sd:.1f} | "
            + ", ".join(f"{v:+.1f}" for v in d) + " |"
        )  # fmt: skip
    return lines


def _epochs(out: dict, key: str) -> str:
    """The epochs the stored ``key`` accuracies were fine-tuned for (runs before the count was
    kept per model fine-tuned ``finetuned`` for the file's ``epochs``)."""
    default = out["epochs"] if key == "finetuned" else None
    got = {
        m.get(f"{key}_epochs", default)
        for c in out["cases"]
        for m in c["methods"].values()
        if key in m
    }
    return "/".join(str(e) for e in sorted(got, key=str)) if got else "—"


def render(out: dict) -> str:
    long, short = _epochs(out, "finetuned"), _epochs(out, "finetuned_short")
    lines = [
        "# Accuracy at a measured speed (digits, 32×32, ORT CPU batch 8)",
        "",
        f"{out.get('train_images', 1200)} training images, {out.get('test_images', 597)} test "
        f"images; teachers trained {out.get('teacher_epochs', TEACHER_EPOCHS)} epochs.",
        "",
        f"commit {out['commit']}; seeds {out['seeds']}; fine-tuning {long} epochs and, from the "
        f"same start, {short} (KD from the teacher, T=4, one-cycle); mean ± sd over seeds, %.",
        "",
        "| arch | budget | method | measured ratio | min width | blocks/convs gone | params | "
        f"delivered | BN re-estimated | fine-tuned {long} ep | fine-tuned {short} ep |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by: dict = {}
    for c in out["cases"]:
        for name, m in c["methods"].items():
            by.setdefault((c["arch"], c["budget"], name), []).append(m)
    for (arch, budget, name), ms in sorted(by.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        if not all("finetuned" in m for m in ms):
            continue
        r = np.array([m["ratio"] for m in ms])
        lines.append(
            f"| {arch} | {budget} | {name} | {r.mean():.3f} ({r.min():.3f}–{r.max():.3f}) | "
            f"{np.mean([m['min_width'] for m in ms]):.2f} | "
            f"{np.mean([m['convs_removed'] for m in ms]):.1f} | "
            f"{np.mean([m['params'] for m in ms]) / 1e3:.0f}k | "
            f"{_mean_sd([m['delivered'] for m in ms])} | "
            f"{_mean_sd([m['recalibrated'] for m in ms])} | "
            f"{_mean_sd([m['finetuned'] for m in ms])} | "
            + (_mean_sd([m["finetuned_short"] for m in ms])
               if all("finetuned_short" in m for m in ms) else "—") + " |"
        )  # fmt: skip
    lines += _paired(out)
    lines += _paired(out, key="finetuned_short", what=f"Fine-tuned ({short} epochs)")
    lines += ["", "Teachers (dense test accuracy, %): " + ", ".join(
        f"{k} {_mean_sd(v)}" for k, v in sorted(_teachers(out).items())
    ), "", "## UPSCALE: post-training, equal per-layer sparsity (L2), no fine-tuning", "",
        "| arch | sparsity | unconstrained | constrained | unconstrained, BN re-estimated | "
        "constrained, BN re-estimated | params u / c |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    ups: dict = {}
    for row in out["upscale"]:
        ups.setdefault((row["arch"], row["sparsity"]), []).append(row)
    for (arch, s), rows in sorted(ups.items()):
        u = [r["unconstrained"] for r in rows]
        c = [r["constrained"] for r in rows]
        lines.append(
            f"| {arch} | {s} | {_mean_sd([v['accuracy'] for v in u])} | "
            f"{_mean_sd([v['accuracy'] for v in c])} | "
            f"{_mean_sd([v['accuracy_recalibrated'] for v in u])} | "
            f"{_mean_sd([v['accuracy_recalibrated'] for v in c])} | "
            f"{np.mean([v['params'] for v in u]) / 1e3:.0f}k / "
            f"{np.mean([v['params'] for v in c]) / 1e3:.0f}k |"
        )
    return "\n".join(lines + _upscale_equal_params(out["upscale"])) + "\n"


def _upscale_equal_params(upscale: list[dict]) -> list[str]:
    """UPSCALE's comparison at equal parameter counts, each side anchored at its own sparsity."""
    lines = [
        "",
        "## UPSCALE at equal parameters: post-training, BN re-estimated, no fine-tuning",
        "",
        "Each side at its own sparsity, the other's bisected until the parameter counts match.",
        "",
        "| arch | anchor | params u / c | unconstrained (sparsity) | constrained (sparsity) | "
        "u − c, paired by seed (points) |",
        "|---|---|---|---|---|---|",
    ]
    anchors = (
        ("unconstrained", "constrained_at_unconstrained_params", "unconstrained"),
        ("constrained", "constrained", "unconstrained_at_constrained_params"),
    )
    by: dict = {}
    for row in upscale:
        if "constrained_at_unconstrained_params" in row:  # rows of runs before the matching
            by.setdefault((row["arch"], row["sparsity"]), []).append(row)
    for (arch, s), rows in sorted(by.items()):
        for anchor, c_key, u_key in anchors:
            u = [r[u_key] for r in rows]
            c = [r[c_key] for r in rows]
            diff = [100 * (a["accuracy_recalibrated"] - b["accuracy_recalibrated"])
                    for a, b in zip(u, c, strict=True)]  # fmt: skip
            lines.append(
                f"| {arch} | {anchor} at {s} | "
                f"{np.mean([v['params'] for v in u]) / 1e3:.0f}k / "
                f"{np.mean([v['params'] for v in c]) / 1e3:.0f}k | "
                f"{_mean_sd([v['accuracy_recalibrated'] for v in u])} "
                f"({np.mean([v['sparsity'] for v in u]):.2f}) | "
                f"{_mean_sd([v['accuracy_recalibrated'] for v in c])} "
                f"({np.mean([v['sparsity'] for v in c]):.2f}) | "
                f"{np.mean(diff):+.1f} ± {np.std(diff, ddof=1) if len(diff) > 1 else 0.0:.1f} "
                f"({', '.join(f'{d:+.1f}' for d in diff)}) |"
            )
    return lines


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = sorted({c["arch"] for c in out["cases"]})
    fig, axes = plt.subplots(1, len(archs), figsize=(6 * len(archs), 4), squeeze=False)
    for ax, arch in zip(axes[0], archs, strict=True):
        for name in sorted({n for c in out["cases"] for n in c["methods"]}):
            pts = [
                (c["methods"][name]["ratio"], 100 * c["methods"][name]["finetuned"])
                for c in out["cases"]
                if c["arch"] == arch and "finetuned" in c["methods"].get(name, {})
            ]
            if pts:
                ax.scatter(*zip(*pts, strict=True), label=name, alpha=0.7)
        t = _teachers(out).get(arch, [])
        if t:
            ax.scatter([1.0], [100 * np.mean(t)], marker="*", s=120, c="k", label="dense")
        ax.set(title=arch, xlabel="measured latency / dense (ORT CPU, batch 8)",
               ylabel="test accuracy after fine-tuning (%)")  # fmt: skip
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argument_parser(__doc__, out=RESULTS / "accuracy.json")
    p.add_argument("--archs", nargs="*", default=list(ARCHS))
    p.add_argument("--budgets", nargs="*", type=float, default=BUDGETS)
    p.add_argument("--seeds", nargs="*", type=int, default=SEEDS)
    p.add_argument("--methods", nargs="*", default=METHODS)
    p.add_argument("--variants", nargs="*", default=["fxprune"], choices=list(VARIANTS))
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--short-epochs", type=int, default=SHORT_EPOCHS, help="0: none")
    p.add_argument("--teacher-epochs", type=int, default=TEACHER_EPOCHS)
    p.add_argument("--stage", choices=("all", "teachers", "prune", "upscale", "finetune", "report"),
                   default="all")  # fmt: skip
    p.add_argument(
        "--redo", action="store_true", help="prune cases again even where every method is kept"
    )
    p.add_argument("--work", type=Path, default=None, help="default ~/.cache/fxprune/accuracy")
    p.add_argument("--train-per-class", type=int, default=None, help="the low-data split")
    args = p.parse_args(argv)
    suffix = f"_n{args.train_per_class}" if args.train_per_class else ""
    if args.work is None:
        args.work = Path.home() / ".cache" / "fxprune" / f"accuracy{suffix}"
    if suffix and args.out == RESULTS / "accuracy.json":
        args.out = RESULTS / f"accuracy{suffix}.json"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("fxprune").setLevel(logging.WARNING)
    torch.set_num_threads(2)
    torch.set_flush_denormal(True)  # a denormal storm can slow CPU training tenfold
    args.work.mkdir(parents=True, exist_ok=True)
    variants = ["fxprune", *[v for v in args.variants if v != "fxprune"]]
    state_path = args.work / "cases.json"
    out = json.loads(state_path.read_text()) if state_path.exists() else {}
    data = digits(args.train_per_class)
    out.update(
        commit=commit(), seeds=args.seeds, epochs=args.epochs, short_epochs=args.short_epochs,
        train_images=len(data[1]), test_images=len(data[3]), teacher_epochs=args.teacher_epochs,
    )  # fmt: skip
    out.setdefault("cases", [])
    out.setdefault("upscale", [])
    out.setdefault("teachers", {})
    xtr, ytr, xte, yte = data
    calib = Loader(xtr, ytr, 64, train=False)
    train = Loader(xtr, ytr, 64, train=True)
    backend = cpu_backend("ort") if args.stage in ("all", "prune") else None
    stages = ["teachers", "prune", "finetune", "report"] if args.stage == "all" else [args.stage]

    def find(arch, seed, budget):
        for c in out["cases"]:
            if (c["arch"], c["seed"], c["budget"]) == (arch, seed, budget):
                return c
        return None

    def todo(old, names):
        """What of ``names`` a case must prune: all of them without a kept case or with
        --redo; else the ones it lacks."""
        return list(names) if old is None or args.redo else [
            n for n in names if n not in old["methods"]
        ]  # fmt: skip

    for arch in args.archs:
        for seed in args.seeds:
            if not set(stages) & {"teachers", "prune", "upscale", "finetune"}:
                continue
            teacher = train_teacher(arch, seed, data, args.teacher_epochs, args.work)
            out["teachers"][f"{arch}/{seed}"] = accuracy(teacher, xte, yte)
            for budget in args.budgets if "prune" in stages else ():
                old = find(arch, seed, budget)
                baselines = [m for m in args.methods if m != "fxprune"]  # fxprune: variants
                methods, todo_variants = todo(old, baselines), todo(old, variants)
                if methods or todo_variants:  # a kept case gains only what it lacks
                    case = prune_case(teacher, arch, seed, budget, calib, methods,
                                      todo_variants, args.work, backend, train,
                                      None if args.redo else old)  # fmt: skip
                    if case is not old:  # a new case (or --redo's), not the kept one grown
                        if old:
                            out["cases"].remove(old)
                        out["cases"].append(case)
                    write_json(state_path, out)
            done = any(r["arch"] == arch and r["seed"] == seed for r in out["upscale"])
            if ("prune" in stages and not done) or "upscale" in stages:  # the latter: redo
                out["upscale"] = [
                    r for r in out["upscale"] if (r["arch"], r["seed"]) != (arch, seed)
                ] + upscale_case(teacher, arch, seed, data, calib, UPSCALE_SPARSITIES)
                write_json(state_path, out)
            for budget in args.budgets if "finetune" in stages else ():
                case = find(arch, seed, budget)
                if case is not None:
                    finetune_case(case, teacher, data, calib, args.work, args.epochs,
                                  args.short_epochs)  # fmt: skip
                    write_json(state_path, out)
    if set(stages) & {"report", "finetune", "upscale"}:
        write_results(args.out, out, render(out))
        plot(out, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
