"""Command line: ``fxprune compile | prune | analyze`` on torchvision models or checkpoints.

``compile`` is the main job: prune to a latency budget measured on ONNX Runtime and write the
pruned model, its ONNX file and a report. ``prune`` applies a given plan (or a uniform one);
``analyze`` reports coupling groups and blocks.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

__all__ = ["main"]


def _load_model(name: str, checkpoint: str | None) -> torch.nn.Module:
    try:
        import torchvision
    except ImportError as exc:  # pragma: no cover
        raise SystemExit(
            "The CLI builds torchvision models: pip install 'fxprune[vision]'"
        ) from exc
    model = torchvision.models.get_model(name, weights=None)
    if checkpoint:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
    return model.eval()


def _summary_table(report: dict) -> Table:
    table = Table(title=f"fxprune — {report['model']}", show_header=True)
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for k, v in report["summary"].items():
        if isinstance(v, float):
            table.add_row(k, f"{v:.3f}")
        elif isinstance(v, int) and not isinstance(v, bool):
            table.add_row(k, f"{v:,}")
        else:
            table.add_row(k, str(v))
    return table


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fxprune", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (
        ("compile", "prune to a latency budget measured on the runtime"),
        ("analyze", "report groups and blocks"),
        ("prune", "apply a plan (or a uniform one) and write the result"),
    ):
        s = sub.add_parser(name, help=help_)
        s.add_argument(
            "--model", default="resnet50", help="torchvision model name (random weights)"
        )
        s.add_argument("--checkpoint", help="state dict to load into the model")
        s.add_argument("--size", type=int, default=224, help="input resolution (square)")
        s.add_argument("--batch", type=int, default=1)
        s.add_argument("--out", type=Path, default=None, help="output directory")
    co = sub.choices["compile"]
    co.add_argument(
        "--budget",
        default="0.5",
        help="latency budget: a fraction of the dense latency (0.5, '0.5x') or a time ('25ms')",
    )
    co.add_argument("--backend", default="onnxruntime", help="onnxruntime (default) or torch")
    co.add_argument("--solver", default="minlp", choices=["minlp", "knapsack", "uniform"])
    co.add_argument("--time-limit", type=float, default=30.0, help="SCIP time limit (s)")
    co.add_argument("--max-rounds", type=int, default=4, help="solve-measure rounds at most")
    co.add_argument("--no-blocks", action="store_true", help="never remove residual blocks")
    co.add_argument(
        "--coupling",
        default="constrained",
        choices=["constrained", "unconstrained"],
        help="unconstrained: each conv keeps its own input channels (UPSCALE), reordered",
    )
    co.add_argument("--cache", type=Path, help="latency cache directory")
    co.add_argument("--no-onnx", action="store_true", help="skip the ONNX export")
    co.add_argument("--strict", action="store_true", help="exit 1 if the budget was missed")
    pr = sub.choices["prune"]
    pr.add_argument("--keep", type=float, default=0.5, help="fraction of channels kept per group")
    pr.add_argument("--multiple", type=int, default=8, help="round kept counts to this multiple")
    pr.add_argument("--plan", type=Path, help="apply this plan JSON instead of a uniform plan")
    pr.add_argument("--no-onnx", action="store_true", help="skip the ONNX export")
    return p


def main(argv: list[str] | None = None) -> int:
    import fxprune
    from fxprune.core.io import atomic_write, write_json, write_text

    args = _parser().parse_args(argv)
    console = Console(stderr=True)
    out = args.out or Path("runs") / args.model
    x = torch.randn(args.batch, 3, args.size, args.size)
    if args.command == "compile":
        return _compile(args, console, out, x)
    timings: dict[str, float] = {}
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console
    ) as progress:

        def stage(desc: str):
            return progress.add_task(desc, total=1)

        t = stage(f"building {args.model}")
        model = _load_model(args.model, args.checkpoint)
        progress.update(t, completed=1)
        t = stage("tracing and analysing channel groups and blocks")
        start = time.perf_counter()
        analysis = fxprune.analyze(model, x)
        timings["analyze_s"] = time.perf_counter() - start
        progress.update(t, completed=1)
        if args.command == "analyze":
            report = fxprune.analysis_report(analysis)
        else:
            t = stage("planning and rewriting")
            start = time.perf_counter()
            if args.plan:
                plan = fxprune.Plan.load(args.plan)
            else:
                plan = fxprune.uniform_plan(analysis, args.keep, multiple=args.multiple)
            pruned = fxprune.prune(analysis, plan)
            timings["prune_s"] = time.perf_counter() - start
            with torch.no_grad():
                err = (pruned(x) - fxprune.masked_forward(analysis, plan, x)).abs().max().item()
            progress.update(t, completed=1)
            report = fxprune.analysis_report(analysis, plan, pruned)
            report["summary"]["max_abs_diff_vs_masking_oracle"] = err
            t = stage(f"writing {out}")
            plan.save(out / "plan.json")
            atomic_write(out / "pruned_state_dict.pt", lambda p: torch.save(pruned.state_dict(), p))
            atomic_write(out / "pruned_model.pt", lambda p: torch.save(pruned, p))
            try:
                from fxprune.pipeline.plots import plot_widths

                plot_widths(analysis, plan, out / "widths.png")
            except ImportError:  # matplotlib is optional
                pass
            if not args.no_onnx:
                start = time.perf_counter()
                fxprune.export_onnx(pruned, out / "pruned.onnx", x)
                timings["onnx_s"] = time.perf_counter() - start
            progress.update(t, completed=1)
        report["timings"] = timings
    if args.out or args.command == "prune":
        write_json(out / "report.json", report)
        write_text(out / "report.md", fxprune.render_markdown(report))
    console.print(_summary_table(report))
    if args.out or args.command == "prune":
        console.print(f"wrote {out}/ (plan.json, pruned model, ONNX, report.md, report.json)")
    return 0


def _compile(args: argparse.Namespace, console: Console, out: Path, x: torch.Tensor) -> int:
    import fxprune

    budget = args.budget  # "0.5", "0.5x" or "25ms": Budget.parse reads all of them
    model = _load_model(args.model, args.checkpoint)
    console.log(f"compiling {args.model} ({args.batch}×3×{args.size}×{args.size}) to {budget}")
    try:
        result = fxprune.compile(
            model,
            budget,
            example_inputs=x,
            backend=args.backend,
            cache=args.cache,
            solver=args.solver,
            time_limit=args.time_limit,
            max_rounds=args.max_rounds,
            allow_block_removal=not args.no_blocks,
            coupling=args.coupling,
        )
    except fxprune.InfeasibleBudget as exc:
        console.print(f"[red]{exc}")
        return 2
    result.save(out, onnx=not args.no_onnx)
    report = {"model": args.model, "summary": result.summary()}
    console.print(_summary_table(report))
    console.print(
        f"wrote {out}/ (plan.json, pruned_state_dict.pt, pruned_model.pt"
        f"{'' if args.no_onnx else ', pruned.onnx'}, report.md, report.json, widths.png)"
    )
    if not result.budget_met:
        console.print(
            f"[yellow]no round met the budget within tolerance; wrote the closest plan "
            f"({result.measured_ms / result.budget_ms:.3f}× budget, see report.md)"
        )
        return 1 if args.strict else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
