"""How closely compile's measured budget loop lands, round by round, on small trained nets.

The accuracy bench's digits teachers (:mod:`bench.accuracy`; trained and cached there) are
compiled at each budget on ONNX Runtime CPU at batch 8, where the latency tables are furthest
off (narrow layers, per-kernel overhead): the first plan often measures far over its
prediction and the first refit far under. Every round's predicted and measured ratio is kept,
and from them what the loop would have returned with fewer rounds (the most important plan
that met the budget among the first ``k``; else the closest), so one run shows what
``LoopConfig.max_rounds`` buys. All timing: run it on a quiet machine.

Writes ``bench/results/budget_loop.json`` / ``.md``.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

import fxprune
from bench import accuracy as A
from bench._common import RESULTS, argument_parser, commit, cpu_backend, write_results
from bench._digits import ARCHS, Loader, digits

logger = logging.getLogger("bench.budget_loop")

BUDGETS = [0.5, 0.3]
SEEDS = [0, 1]
ROUNDS = 6


def returned(rounds: list[dict], k: int) -> dict:
    """The round the loop returns when it stops after the first ``k`` rounds."""
    first = rounds[:k]
    met = [r for r in first if r["met"]]
    if met:
        return max(met, key=lambda r: r["importance_kept"])
    return min(first, key=lambda r: r["measured_over_budget"])


def case(teacher, budget: float, calib, backend, config: fxprune.CompileConfig) -> dict:
    res = A.compile_teacher(teacher, budget, calib, backend, config)
    return {"budget": budget, "rounds": [r.to_dict() for r in res.rounds]}


def render(out: dict) -> str:
    ks = list(range(2, out["max_rounds"] + 1))
    lines = [
        "# The budget loop round by round (digits teachers, ORT CPU batch 8)",
        "",
        f"commit {out['commit']}; confirm {out['confirm']}. Ratios are of the dense model "
        "measured side by side in that round; `*` met the budget (≤ 1.02×, its own measurement).",
        "",
        "| arch | seed | budget | rounds: predicted → measured | "
        + " | ".join(f"returned after {k}" for k in ks)
        + " |",
        "|---|---|---|---|" + "---|" * len(ks),
    ]
    for c in out["cases"]:
        rs = c["rounds"]
        steps = ", ".join(
            f"{r['predicted_ms'] / r['dense_ms']:.2f}→{r['measured_ms'] / r['dense_ms']:.2f}"
            + ("*" if r["met"] else "")
            for r in rs
        )
        cells = []
        for k in ks:
            r = returned(rs, k)
            mark = "" if r["met"] else " (missed)"
            cells.append(f"{r['measured_over_budget']:.3f}× budget{mark}")
        lines.append(
            f"| {c['arch']} | {c['seed']} | {c['budget']} | {steps} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argument_parser(__doc__, out=RESULTS / "budget_loop.json")
    p.add_argument("--archs", nargs="*", default=list(ARCHS))
    p.add_argument("--seeds", nargs="*", type=int, default=SEEDS)
    p.add_argument("--budgets", nargs="*", type=float, default=BUDGETS)
    p.add_argument("--rounds", type=int, default=ROUNDS)
    p.add_argument("--no-confirm", action="store_true", help="LoopConfig(confirm=False)")
    p.add_argument("--work", type=Path, default=Path.home() / ".cache" / "fxprune" / "accuracy")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("fxprune").setLevel(logging.WARNING)
    torch.set_num_threads(2)
    torch.set_flush_denormal(True)
    args.work.mkdir(parents=True, exist_ok=True)
    data = digits()
    calib = Loader(data[0], data[1], 64, train=False)
    backend = cpu_backend("ort")
    config = A._compile_config(args.work)
    loop = fxprune.LoopConfig(max_rounds=args.rounds, confirm=not args.no_confirm)
    config = dataclasses.replace(config, loop=loop)
    out: dict = {"commit": commit(), "max_rounds": args.rounds, "confirm": loop.confirm}
    out["cases"] = []
    for arch in args.archs:
        for seed in args.seeds:
            teacher = A.train_teacher(arch, seed, data, A.TEACHER_EPOCHS, args.work)
            for budget in args.budgets:
                row = {"arch": arch, "seed": seed, **case(teacher, budget, calib, backend, config)}
                logger.info("%s s%d %.2f: %d rounds", arch, seed, budget, len(row["rounds"]))
                out["cases"].append(row)
    write_results(args.out, out, render(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
