"""How a consumer should read a subset of its producer's channels on the runtime: a unit bench.

Why: unconstrained exports pay on ONNX Runtime CPU although reordering turns most gathers into
slices (bench/unconstrained.py). This bench isolates the read. A producer (1×1 conv + ReLU)
feeds a consumer (1×1 conv) that keeps k ≈ 0.7·C of the C channels, as two runs (what a
reordered consumer with two intervals looks like). Every unit is timed side by side with the
others, as a ratio to ``full`` (paired per round).

Over a C-channel producer (the union of all consumers, as UCPE keeps it):

- ``full``: the consumer reads all C channels (zero weight columns, no copy);
- ``slice``: one ``narrow`` of k contiguous channels (what a consumer made contiguous reads);
- ``gather``: one ``index_select`` of the two runs;
- ``split``: one ``narrow`` per run, a partial conv on each, and their sum.

Over a k-channel producer (only what this consumer reads):

- ``constrained``: one producer of k channels, the consumer reads it whole;
- ``segmented``: the producer emitted as one conv per run (separate tensors), the consumer as a
  sum of partial convs. No op ever cuts a tensor along channels, so ONNX Runtime's blocked
  (NCHWc) layout is never left; this is the representation a zero-copy unconstrained export
  would use, with every tensor that consumers read different subsets of kept as segments.

    python -m bench.segmented_reads [--backend ort|torch] [--out bench/results/segmented_reads.json]
"""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from bench._common import (
    RESULTS,
    argument_parser,
    commit,
    cpu_backend,
    paired_ratios,
    write_results,
)
from fxprune.backends import MeasureConfig

__all__ = ["ReadUnit", "main"]

#: (C, consumer outputs, resolution): a ResNet-50 stage-1 and stage-3 stream read by a
#: bottleneck's first conv, and a MobileNetV2-like expansion
SHAPES = [(256, 64, 56), (1024, 256, 14), (128, 512, 28)]
KINDS = ["full", "slice", "gather", "split", "constrained", "segmented"]
MEASURE = MeasureConfig(warmup=5, repeats=20, min_seconds=1.0)


def runs_of(c: int, keep: float = 0.7, multiple: int = 16) -> list[tuple[int, int]]:
    """Two runs covering ``keep`` of ``c`` channels (a multiple of ``multiple``): head and tail."""
    k = max(multiple, int(keep * c) // multiple * multiple)
    head = k // 2
    return [(0, head), (c - (k - head), c)]


class ReadUnit(nn.Module):
    """A producer and one consumer that reads the channels in ``runs``, the way ``kind`` says."""

    def __init__(self, kind: str, c: int, c_out: int, runs: list[tuple[int, int]]) -> None:
        super().__init__()
        self.kind, self.runs = kind, runs
        self.k = k = sum(e - s for s, e in runs)
        widths = [e - s for s, e in runs]
        if kind == "segmented":
            self.producers = nn.ModuleList(nn.Conv2d(c, w, 1) for w in widths)
        else:
            self.producer = nn.Conv2d(c, k if kind == "constrained" else c, 1)
        if kind in ("split", "segmented"):
            # the bias once, on the first partial conv
            self.parts = nn.ModuleList(
                nn.Conv2d(w, c_out, 1, bias=i == 0) for i, w in enumerate(widths)
            )
        else:
            self.consumer = nn.Conv2d(c if kind == "full" else k, c_out, 1)
        index = torch.cat([torch.arange(s, e) for s, e in runs])
        self.register_buffer("index", index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "segmented":
            parts = [torch.relu(p(x)) for p in self.producers]
            return _sum(part(y) for part, y in zip(self.parts, parts, strict=True))
        y = torch.relu(self.producer(x))
        if self.kind == "split":
            cut = (torch.narrow(y, 1, s, e - s) for s, e in self.runs)
            return _sum(part(z) for part, z in zip(self.parts, cut, strict=True))
        if self.kind == "slice":
            y = torch.narrow(y, 1, 0, self.k)
        elif self.kind == "gather":
            y = torch.index_select(y, 1, self.index)
        return self.consumer(y)


def _sum(terms) -> torch.Tensor:
    out = None
    for t in terms:
        out = t if out is None else out + t
    return out


def main(argv: list[str] | None = None) -> int:
    p = argument_parser(__doc__)
    p.add_argument("--backend", choices=["ort", "torch"], default="ort")
    p.add_argument("--repeats", type=int, default=3, help="side-by-side measurements per shape")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    out_path = args.out or RESULTS / f"segmented_reads_{args.backend}.json"
    backend = cpu_backend(args.backend)
    out: dict = {"backend": repr(backend), "identity": backend.identity(), "commit": commit()}
    out["cases"] = []
    table = Table(title=f"read ÷ full ({args.backend}, batch 1; median of {args.repeats})")
    for col in ["C→out @ HW", "k", "full ms", *KINDS]:
        table.add_column(col, justify="right")
    for c, c_out, hw in SHAPES:
        torch.manual_seed(0)
        runs = runs_of(c)
        units = [ReadUnit(kind, c, c_out, runs).eval() for kind in KINDS]
        x = torch.randn(1, c, hw, hw)
        with torch.no_grad():
            _check_equal(units, units[KINDS.index("full")], x, runs)
        variants = dict(zip(KINDS, units, strict=True))
        ratios, rounds = paired_ratios(
            backend, variants, x, args.repeats, MEASURE, reference="full", shuffle=False
        )
        full_ms = [r["full"].median_ms for r in rounds]
        med = {k: float(torch.tensor(v).median()) for k, v in ratios.items()}
        case = {"c": c, "c_out": c_out, "hw": hw, "runs": runs, "full_ms": full_ms}
        out["cases"].append({**case, "vs_full": med, "vs_full_runs": ratios})
        k = sum(e - s for s, e in runs)
        table.add_row(
            f"{c}→{c_out} @ {hw}", str(k), f"{min(full_ms):.3f}", *(f"{med[x]:.3f}" for x in KINDS)
        )
        write_results(out_path, out)
    Console().print(table)
    return 0


def _check_equal(units: list[ReadUnit], full: ReadUnit, x: torch.Tensor, runs) -> None:
    """Give the units equal weights and check that they compute the same: each copying read
    what ``full`` computes with zero weight columns for the inputs that read drops,
    ``segmented`` what ``constrained`` computes. The bench compares equals."""
    y = torch.relu(full.producer(x))
    for u in units:
        if u is full or u.kind in ("constrained", "segmented"):
            continue
        u.producer.load_state_dict(full.producer.state_dict())
        keep = torch.arange(u.k) if u.kind == "slice" else u.index
        w = full.consumer.weight[:, keep]
        if u.kind == "split":
            for part, cols in zip(
                u.parts, torch.split(w, [e - s for s, e in runs], 1), strict=True
            ):
                part.weight.copy_(cols)
            u.parts[0].bias.copy_(full.consumer.bias)
        else:
            u.consumer.weight.copy_(w)
            u.consumer.bias.copy_(full.consumer.bias)
        masked = torch.zeros_like(y)
        masked[:, keep] = y[:, keep]
        torch.testing.assert_close(u(x), full.consumer(masked), rtol=1e-4, atol=1e-4)
    con, seg = (next(u for u in units if u.kind == kind) for kind in ("constrained", "segmented"))
    start = 0
    for producer, part in zip(seg.producers, seg.parts, strict=True):
        rows = slice(start, start + producer.out_channels)
        producer.weight.copy_(con.producer.weight[rows])
        producer.bias.copy_(con.producer.bias[rows])
        part.weight.copy_(con.consumer.weight[:, rows])
        start += producer.out_channels
    seg.parts[0].bias.copy_(con.consumer.bias)
    torch.testing.assert_close(seg(x), con(x), rtol=1e-4, atol=1e-4)


if __name__ == "__main__":
    raise SystemExit(main())
