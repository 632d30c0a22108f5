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
schedule, seed and distillation from the teacher). Mean and spread are over seeds. The UPSCALE
comparison prunes each teacher post-training (no fine-tuning) at equal per-layer sparsity with
unconstrained masks (each consumer its own best inputs) and with constrained ones (every
consumer of a tensor the same channels), by L2 magnitude.

Stages (``--stage``): ``teachers`` (train, no timing), ``prune`` (all timing happens here: run
it on a quiet machine), ``finetune`` (no timing), ``report``; ``all`` runs them in order.
Teachers, pruned models and measurements are kept in ``--work`` so a stage can be re-run alone.
Writes ``bench/results/accuracy.json`` / ``.md`` and ``accuracy.png``.
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
MATCH = 0.02
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


def prune_case(teacher, arch, seed, budget, calib, methods, variants, work, backend, train):
    """Every method's pruned model at ``budget`` (saved in ``work``) and its measured ratio."""
    x = _x()
    case: dict = {"arch": arch, "seed": seed, "budget": budget, "methods": {}}
    dense_gm = fxprune.analyze(teacher, x).gm

    def keep(name, model, info):
        torch.save(model, work / f"pruned_{arch}_s{seed}_b{budget}_{name}.pt")
        case["methods"][name] = {**info, **plan_stats(model, teacher)}
        logger.info("%s s%d %.2f %s: ratio %.3f", arch, seed, budget, name, info["ratio"])

    for name in variants:
        start = time.perf_counter()
        res = fxprune.compile(
            teacher, budget, example_inputs=x, data=calib, loss_fn=F.cross_entropy,
            max_batches=CALIB_BATCHES, backend=backend,
            config=_compile_config(work, **VARIANTS[name]),
        )  # fmt: skip
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
        res = fxprune.compile(
            teacher, budget, example_inputs=x, data=calib, loss_fn=F.cross_entropy,
            max_batches=CALIB_BATCHES, backend=backend,
            config=_compile_config(work, unconstrained=fxprune.UnconstrainedConfig()),
        )  # fmt: skip
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


def upscale_case(teacher, arch, seed, data, calib, sparsities) -> list[dict]:
    """UPSCALE's post-training comparison: unconstrained vs constrained masks, no training."""
    from fxprune.unconstrained.masks import magnitude_masks

    x = _x()
    _, _, xte, yte = data
    analysis = fxprune.analyze(teacher, x)
    rows = []
    for s in sparsities:
        row: dict = {"arch": arch, "seed": seed, "sparsity": s}
        for name, pool in (("unconstrained", None), ("constrained", 0.0)):
            masks = magnitude_masks(analysis, s, pool=pool)
            model = fxprune.prune(analysis, fxprune.unconstrained_plan(analysis, masks))
            kept = sum(int(np.sum(m)) for m in masks.values())
            row[name] = {"accuracy": accuracy(model, xte, yte), "params": params(model)}
            fxprune.recalibrate_norms(model, calib, max_batches=CALIB_BATCHES)
            row[name]["accuracy_recalibrated"] = accuracy(model, xte, yte)
            row[name]["inputs_kept"] = kept
        rows.append(row)
    return rows


# -- fine-tuning (no timing) --------------------------------------------------------------


def finetune_case(case, teacher, data, calib, work, epochs: int) -> None:
    xtr, ytr, xte, yte = data
    arch, seed, budget = case["arch"], case["seed"], case["budget"]
    for name, m in case["methods"].items():
        if "finetuned" in m:
            continue
        model = torch.load(work / f"pruned_{arch}_s{seed}_b{budget}_{name}.pt", weights_only=False)
        m["delivered"] = accuracy(model, xte, yte)
        fxprune.recalibrate_norms(model, calib, max_batches=CALIB_BATCHES)
        m["recalibrated"] = accuracy(model, xte, yte)
        cfg = fxprune.FinetuneConfig(epochs=epochs, lr=0.05, seed=seed, progress=False)
        start = time.perf_counter()
        fxprune.finetune(model, Loader(xtr, ytr, 64, train=True), teacher=teacher, config=cfg)
        m["finetuned"] = accuracy(model, xte, yte)
        m["finetune_seconds"] = time.perf_counter() - start
        logger.info(
            "%s s%d %.2f %s: %.1f → %.1f → %.1f %%", arch, seed, budget, name,
            100 * m["delivered"], 100 * m["recalibrated"], 100 * m["finetuned"],
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


def _paired(out: dict, against: str = "torch_pruning") -> list[str]:
    """Per arch and budget, each fxprune variant's fine-tuned accuracy minus ``against``'s,
    paired by seed (the same teacher): mean ± sd of the differences, in points."""
    diffs: dict = {}
    for c in out["cases"]:
        base = c["methods"].get(against, {}).get("finetuned")
        if base is None:
            continue
        for name, m in c["methods"].items():
            if name != against and "finetuned" in m:
                key = (c["arch"], c["budget"], name)
                diffs.setdefault(key, []).append(100 * (m["finetuned"] - base))
    if not diffs:
        return []
    lines = ["", f"## Fine-tuned accuracy minus {against}'s, paired by seed (points)", "",
             "| arch | budget | method | mean ± sd | per seed |", "|---|---|---|---|---|"]  # fmt: skip
    for (arch, budget, name), d in sorted(diffs.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        sd = np.std(d, ddof=1) if len(d) > 1 else 0.0
        lines.append(
            f"| {arch} | {budget} | {name} | {np.mean(d):+.1f} ± {sd:.1f} | "
            + ", ".join(f"{v:+.1f}" for v in d) + " |"
        )  # fmt: skip
    return lines


def render(out: dict) -> str:
    lines = [
        "# Accuracy at a measured speed (digits, 32×32, ORT CPU batch 8)",
        "",
        f"commit {out['commit']}; seeds {out['seeds']}; fine-tuning {out['epochs']} epochs "
        f"(KD from the teacher, T=4, one-cycle); mean ± sd over seeds, %.",
        "",
        "| arch | budget | method | measured ratio | min width | blocks/convs gone | params | "
        "delivered | BN re-estimated | fine-tuned |",
        "|---|---|---|---|---|---|---|---|---|---|",
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
            f"{_mean_sd([m['finetuned'] for m in ms])} |"
        )
    lines += _paired(out)
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
    return "\n".join(lines) + "\n"


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
    p.add_argument("--teacher-epochs", type=int, default=TEACHER_EPOCHS)
    p.add_argument("--stage", choices=("all", "teachers", "prune", "finetune", "report"),
                   default="all")  # fmt: skip
    p.add_argument("--work", type=Path, default=Path.home() / ".cache" / "fxprune" / "accuracy")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("fxprune").setLevel(logging.WARNING)
    torch.set_num_threads(2)
    torch.set_flush_denormal(True)  # a denormal storm can slow CPU training tenfold
    args.work.mkdir(parents=True, exist_ok=True)
    variants = ["fxprune", *[v for v in args.variants if v != "fxprune"]]
    state_path = args.work / "cases.json"
    out = json.loads(state_path.read_text()) if state_path.exists() else {}
    out.update(commit=commit(), seeds=args.seeds, epochs=args.epochs)
    out.setdefault("cases", [])
    out.setdefault("upscale", [])
    out.setdefault("teachers", {})
    data = digits()
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

    for arch in args.archs:
        for seed in args.seeds:
            if not set(stages) & {"teachers", "prune", "finetune"}:
                continue
            teacher = train_teacher(arch, seed, data, args.teacher_epochs, args.work)
            out["teachers"][f"{arch}/{seed}"] = accuracy(teacher, xte, yte)
            for budget in args.budgets if "prune" in stages else ():
                old = find(arch, seed, budget)
                done = old and all(v in old["methods"] for v in [*variants, *args.methods[1:]])
                if not done:
                    case = prune_case(teacher, arch, seed, budget, calib, args.methods,
                                      variants, args.work, backend, train)  # fmt: skip
                    if old:
                        out["cases"].remove(old)
                    out["cases"].append(case)
                    write_json(state_path, out)
            if "prune" in stages and not any(
                r["arch"] == arch and r["seed"] == seed for r in out["upscale"]
            ):
                out["upscale"] += upscale_case(teacher, arch, seed, data, calib, [0.3, 0.5])
                write_json(state_path, out)
            for budget in args.budgets if "finetune" in stages else ():
                case = find(arch, seed, budget)
                if case is not None:
                    finetune_case(case, teacher, data, calib, args.work, args.epochs)
                    write_json(state_path, out)
    if "report" in stages or args.stage == "all" or "finetune" in stages:
        write_results(args.out, out, render(out))
        plot(out, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
