"""Command line: ``fxprune compile | apply | prune | analyze`` on any model.

``compile`` is the main job: prune to a latency budget measured on ONNX Runtime and write the
pruned model, its ONNX file and a report. ``apply`` applies a saved plan (compile's plan.json)
and writes the same files; ``prune`` applies a given plan or a uniform one; ``analyze`` reports
coupling groups and blocks. ``--model`` names a torchvision or timm model, a factory in a file
or module, or a ``.pt2`` ExportedProgram (:mod:`fxprune.cli_models` loads them).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

if TYPE_CHECKING:
    from fxprune.cli_models import LoadedModel, ModelSpec
    from fxprune.pipeline.compile import Budget

__all__ = ["main"]


#: exit statuses: 1 only for a missed budget under --strict; 2 as argparse's usage errors
EXIT_MISSED = 1
EXIT_USAGE = 2

#: the ways out of an infeasible budget this CLI has flags for (no flag offers smaller counts)
_CLI_SPELLING = {"solver": "pass --solver minlp", "allow_block_removal": "drop --no-blocks"}


#: the flag that sets each resource limit (a ``latency@<runtime>`` limit is an --also)
_LIMIT_FLAGS = {
    "params": "--max-params",
    "macs": "--max-macs",
    "activation_bytes": "--max-activation-bytes",
}


class _UsageError(Exception):
    """An argument that only turns out bad once used (a checkpoint that does not load)."""


def _build(args: argparse.Namespace) -> LoadedModel:
    """The model ``--model`` names, with ``--checkpoint`` loaded; random weights seeded by
    ``--seed`` so that ``compile`` and ``apply`` on the same spec build the same model."""
    from fxprune.cli_models import SpecError, load_checkpoint, load_model

    torch.manual_seed(args.seed)
    loaded = load_model(args.model)  # SpecError: main makes it a usage error
    if args.checkpoint:
        try:
            load_checkpoint(loaded.model, args.checkpoint)
        except SpecError as exc:
            raise _UsageError(str(exc)) from exc
    return loaded


def _example_shape(args: argparse.Namespace, default: tuple[int, ...]) -> tuple[int, ...]:
    """``--input-shape``; else the model's default shape with ``--batch`` and ``--size`` (a
    square resolution) put in where given."""
    if args.input_shape:
        return args.input_shape
    shape = list(default)
    if args.batch is not None:
        shape[0] = args.batch
    if args.size is not None and len(shape) >= 3:
        shape[2:] = [args.size] * (len(shape) - 2)
    return tuple(shape)


# argparse type functions: a bad value is a usage error (exit 2), never a traceback


def _budget(text: str) -> Budget:
    from fxprune.pipeline.compile import Budget

    try:
        return Budget.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def _fraction(text: str) -> float:
    value = _positive(float)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"a fraction of the channels, in (0, 1]; got {text}")
    return value


#: suffixes of --max-params / --max-macs / --max-activation-bytes (decimal; KiB... binary)
_SCALES = {
    "": 1,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
}


def _amount(unit: str) -> Callable[[str], int]:
    """A positive count: an int (``8000000``, ``8_000_000``) or a number with a suffix k/M/G
    (×1000) or Ki/Mi/Gi (×1024), case-insensitive, optionally followed by ``unit``
    (``8MB``, ``1.5MiB``, ``11M``)."""

    def parse(text: str) -> int:
        match = re.fullmatch(
            rf"\s*([0-9][0-9_]*(?:\.[0-9]*)?)\s*(k|m|g|ki|mi|gi)?\s*{unit}?\s*",
            text,
            re.IGNORECASE,
        )
        if match is None:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a count: an integer, optionally with k, M, G (×1000) or "
                f"Ki, Mi, Gi (×1024), e.g. 8000000, 8M{', 8MB or 8MiB' if unit else ''}"
            )
        number, suffix = match.group(1), (match.group(2) or "").lower()
        value = float(number.replace("_", "")) * _SCALES[suffix]
        if value < 1 or value != int(value):
            raise argparse.ArgumentTypeError(f"must be a whole number ≥ 1, got {text!r}")
        return int(value)

    return parse


def _also(text: str) -> tuple[str, Budget]:
    """``BACKEND:BUDGET`` for ``--also``."""
    name, sep, budget = text.partition(":")
    if not sep or not name or not budget:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not BACKEND:BUDGET, e.g. inductor:0.6 or torch:25ms"
        )
    return _backend_name(name), _budget(budget)


def _model_spec(text: str) -> ModelSpec:
    from fxprune.cli_models import SpecError, parse_model_spec

    try:
        return parse_model_spec(text)
    except SpecError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(n) for n in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or any(n <= 0 for n in shape):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a shape: positive integers separated by commas, e.g. 1,3,224,224"
        )
    return shape


def _backend_name(name: str) -> str:
    from fxprune import backends

    if name.lower() not in backends._BACKENDS:
        raise argparse.ArgumentTypeError(
            f"unknown backend {name!r}; choose one of {', '.join(sorted(backends._BACKENDS))}"
        )
    return name


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


def _epilog(command: str, extra: str) -> str:
    """``--help``'s examples: one per ``--model`` form, then the command's own."""
    from fxprune.cli_models import forms_text

    examples = "\n".join(
        f"  fxprune {command} --model {form}{extra}"
        for form in (
            "torchvision:resnet50",
            "resnet50",
            "timm:efficientnet_b0",
            "path/to/file.py:factory",
            "package.module:factory",
            "model.pt2",
        )
    )
    if command == "compile":  # the --data forms, for Taylor importance
        examples += (
            "\n  fxprune compile --model resnet50 --data calib/  (.pt files of (inputs, target))"
            "\n  fxprune compile --model resnet50 --data mydata.py:batches --loss mse"
        )
    return (
        f"--model forms:\n{forms_text()}\n\nexamples:\n{examples}\n\n"
        "A factory returns an nn.Module, a torch.export.ExportedProgram, or (module, "
        "input_shape).\nThe example input is --input-shape, else the model's default (timm: "
        "its pretrained config;\n.pt2: its own example; otherwise 1,3,224,224) with --batch "
        "and --size put in."
    )


_COMMANDS = (
    ("compile", "prune to a latency budget measured on the runtime", " --budget 0.5"),
    ("analyze", "report groups and blocks", ""),
    ("prune", "apply a plan (or a uniform one) and write the result", " --keep 0.5"),
    (
        "apply",
        "apply a saved plan (plan.json) and write what compile writes",
        " --plan runs/resnet50/plan.json",
    ),
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fxprune", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_, example in _COMMANDS:
        s = sub.add_parser(
            name,
            help=help_,
            description=help_,
            epilog=_epilog(name, example),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        s.add_argument(
            "--model",
            type=_model_spec,
            default="resnet50",
            help="torchvision:NAME, timm:NAME, FILE.py:FACTORY, MODULE:FACTORY, FILE.pt2 or a "
            "torchvision name (see below; default resnet50)",
        )
        s.add_argument(
            "--checkpoint", help="state dict to load into the model (strictly: every key)"
        )
        s.add_argument(
            "--input-shape",
            type=_shape,
            help="example input shape, e.g. 1,3,224,224 (overrides --size and --batch)",
        )
        s.add_argument(
            "--size",
            type=_positive(int),
            help="input resolution (square; default: the model's, else 224)",
        )
        s.add_argument("--batch", type=_positive(int), help="batch size (default 1)")
        s.add_argument(
            "--seed", type=int, default=0, help="seed for the random weights (default 0)"
        )
        s.add_argument("--out", type=Path, default=None, help="output directory")
        s.set_defaults(usage_error=s.error)  # a --model that does not build: exit 2 with usage
    co = sub.choices["compile"]
    co.add_argument(
        "--budget",
        type=_budget,
        default="0.5",
        help="latency budget: a fraction of the dense latency (0.5, '0.5x') or a time ('25ms')",
    )
    co.add_argument(
        "--backend",
        type=_backend_name,
        default="onnxruntime",
        help="onnxruntime (default), torch (eager) or inductor (torch.compile)",
    )
    co.add_argument("--solver", default="minlp", choices=["minlp", "knapsack", "uniform"])
    co.add_argument("--time-limit", type=_positive(float), default=30.0, help="SCIP time limit (s)")
    co.add_argument(
        "--max-rounds",
        type=_positive(int),
        default=6,  # LoopConfig's (a test ties them; --help imports nothing heavy)
        help="solve-measure rounds at most",
    )
    co.add_argument("--no-blocks", action="store_true", help="never remove residual blocks")
    co.add_argument(
        "--attention",
        default="auto",  # DEFAULT_ATTENTION (a test ties them)
        choices=["head_dim", "heads", "auto"],  # ATTENTION, spelt out: --help stays light
        help="what a multi-head split offers: positions within every head (head_dim), whole "
        "heads (heads), or positions and whole heads where positions cannot be pruned (auto, "
        "the default)",
    )
    co.add_argument(
        "--also",
        type=_also,
        action="append",
        default=[],
        metavar="BACKEND:BUDGET",
        help="a latency budget on a further backend too, measured there (a fraction of the "
        "dense latency on it, or a time), e.g. --also inductor:0.6; repeatable",
    )
    co.add_argument(
        "--max-params",
        type=_amount(""),
        metavar="N",
        help="limit on the pruned model's parameters: an integer or with k/M/G (×1000), e.g. 5M",
    )
    co.add_argument(
        "--max-macs",
        type=_amount(""),
        metavar="N",
        help="limit on the pruned model's conv/linear multiply-accumulates, e.g. 1.2G",
    )
    co.add_argument(
        "--max-activation-bytes",
        type=_amount("b"),
        metavar="BYTES",
        help="limit on the pruned model's peak activation memory at the example input: bytes "
        "as an integer or with k/M/G (×1000) or Ki/Mi/Gi (×1024), B optional, e.g. 8MB, 8MiB",
    )
    co.add_argument(
        "--coupling",
        default="constrained",
        choices=["constrained", "unconstrained"],
        help="unconstrained: each conv keeps its own input channels (UPSCALE), reordered",
    )
    co.add_argument(
        "--data",
        help="batches for Taylor importance (and BatchNorm statistics): a directory of .pt "
        "files each holding (inputs, target), or FILE.py:FUNCTION / MODULE:FUNCTION returning "
        "an iterable of (inputs, target)",
    )
    co.add_argument(
        "--loss",
        default=None,
        help="loss(output, target) for --data: cross_entropy (default), mse, or "
        "FILE.py:FUNCTION / MODULE:FUNCTION",
    )
    co.add_argument("--cache", type=Path, help="latency cache directory")
    co.add_argument("--no-onnx", action="store_true", help="skip the ONNX export")
    co.add_argument("--strict", action="store_true", help="exit 1 if the budget was missed")
    pr = sub.choices["prune"]
    pr.add_argument(
        "--keep", type=_fraction, default=0.5, help="fraction of channels kept per group"
    )
    pr.add_argument(
        "--multiple",
        type=_positive(int),
        default=8,
        help="round kept counts to this multiple",
    )
    pr.add_argument("--plan", type=Path, help="apply this plan JSON instead of a uniform plan")
    pr.add_argument("--no-onnx", action="store_true", help="skip the ONNX export")
    ap = sub.choices["apply"]
    ap.add_argument(
        "--plan", type=Path, required=True, help="the plan to apply (compile's plan.json)"
    )
    ap.add_argument("--no-onnx", action="store_true", help="skip the ONNX export")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run a command; the exit status.

    0: done (with ``compile``, also a missed budget unless ``--strict``). 1: ``compile
    --strict`` and no round met the budget. 2: bad arguments (argparse's usage errors, among
    them a ``--model`` that does not build), or input fxprune cannot use as given: an
    infeasible budget, a model that does not trace at its input shape, a bad ``--plan``,
    ``--checkpoint``, ``--data`` or ``--loss``; the message says what to change.
    """
    import fxprune
    from fxprune.cli_models import SpecError

    parser = _parser()
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    out = args.out or Path("runs") / args.model.name
    try:
        with _library_output(console):
            try:
                loaded = _build(args)
            except SpecError as exc:  # exits 2 with the usage line, as argparse's own errors
                args.usage_error(f"argument --model: {exc}")
            x = torch.randn(_example_shape(args, loaded.input_shape))
            if args.command == "compile":
                return _compile(args, console, out, loaded.model, x)
            return _run(args, console, out, loaded.model, x)
    except (_UsageError, SpecError) as exc:
        console.print(f"fxprune {args.command}: error: {exc}", style="red", markup=False)
    except fxprune.InfeasibleLimit as exc:  # named by the flag that set it
        flag = _LIMIT_FLAGS.get(exc.resource, "--also")
        console.print(f"error: argument {flag}: {exc}", style="red", markup=False)
    except fxprune.InfeasibleBudget as exc:
        console.print(exc.message(_CLI_SPELLING), style="red", markup=False)
    except fxprune.FxpruneError as exc:
        console.print(f"error: {exc}", style="red", markup=False)
    return EXIT_USAGE


@contextlib.contextmanager
def _library_output(console: Console) -> Iterator[None]:
    """Show the library's log messages and progress (``fxprune.core.progress``) with rich."""
    from rich.logging import RichHandler
    from rich.progress import BarColumn, MofNCompleteColumn

    from fxprune.core.progress import reporting

    logger = logging.getLogger("fxprune")
    handler = RichHandler(console=console, show_path=False, markup=False)
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    try:
        with Progress(*columns, console=console) as bars, reporting(bars):
            yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


def _run(
    args: argparse.Namespace,
    console: Console,
    out: Path,
    model: torch.nn.Module | torch.export.ExportedProgram,
    x: torch.Tensor,
) -> int:
    """``analyze``, ``prune`` and ``apply`` (which writes what ``compile`` writes)."""
    import fxprune
    from fxprune.core.io import atomic_write, write_json, write_text

    timings: dict[str, float] = {}
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console
    ) as progress:

        def stage(desc: str):
            return progress.add_task(desc, total=1)

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
    report["model"] = args.model.text
    writes = args.out or args.command != "analyze"
    if writes:
        write_json(out / "report.json", report)
        write_text(out / "report.md", fxprune.render_markdown(report))
    console.print(_summary_table(report))
    if writes:
        console.print(f"wrote {out}/ (plan.json, pruned model, ONNX, report.md, report.json)")
    return 0


def _compile(
    args: argparse.Namespace,
    console: Console,
    out: Path,
    model: torch.nn.Module | torch.export.ExportedProgram,
    x: torch.Tensor,
) -> int:
    """``compile``: prune to the budget, write the result directory, say how it went."""
    import fxprune
    from fxprune.cli_models import load_data, load_loss

    budget = args.budget  # a Budget: argparse parsed it
    if args.loss and not args.data:
        raise _UsageError("argument --loss: needs --data (the batches the loss is taken on)")
    data = load_data(args.data) if args.data else None  # SpecError: main prints it, exit 2
    loss_fn = load_loss(args.loss or "cross_entropy") if data is not None else None
    shape = "×".join(map(str, x.shape))
    console.log(f"compiling {args.model.text} ({shape}) to {budget}")
    config = fxprune.CompileConfig(
        solve=fxprune.SolveConfig(solver=args.solver, time_limit=args.time_limit),
        loop=fxprune.LoopConfig(max_rounds=args.max_rounds),
        unconstrained=fxprune.UnconstrainedConfig() if args.coupling == "unconstrained" else None,
        allow_block_removal=not args.no_blocks,
        cache=args.cache,
        attention=args.attention,
        also=tuple(args.also),
        max_params=args.max_params,
        max_macs=args.max_macs,
        max_activation_bytes=args.max_activation_bytes,
    )
    # InfeasibleBudget: main prints it, exit 2
    result = fxprune.compile(
        model,
        budget,
        example_inputs=x,
        data=data,
        loss_fn=loss_fn,
        backend=args.backend,
        config=config,
    )
    result.save(out, onnx=not args.no_onnx)
    report = {"model": args.model.text, "summary": result.summary()}
    console.print(_summary_table(report))
    console.print(
        f"wrote {out}/ (plan.json, pruned_state_dict.pt, pruned_model.pt"
        f"{'' if args.no_onnx else ', pruned.onnx'}, report.md, report.json, widths.png)"
    )
    if result.dense_meets_budget:
        console.print(
            f"[green]the dense model already meets the budget ({result.dense_ms:.3f} ms ≤ "
            f"{result.budget_ms:.3f} ms): nothing to prune, wrote it unchanged"
        )
    elif not result.budget_met:
        console.print(
            f"[yellow]no round met the budget within tolerance; wrote the closest plan "
            f"({result.measured_ms / result.budget_ms:.3f}× budget, see report.md)"
        )
        return EXIT_MISSED if args.strict else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
