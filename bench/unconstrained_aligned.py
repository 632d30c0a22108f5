"""Unconstrained exports with every conv's inputs aligned to the runtime's channel block,
against constrained pruning at the same kept parameters (ONNX Runtime CPU, batch 1, 224×224).

ONNX Runtime CPU runs a conv in its blocked layout (NCHWc) only when the conv's input channel
count is a multiple of the block (8 with AVX2). Per-layer masks at 30% sparsity leave nearly
every consumer an unaligned count, and ``ours_exact`` then runs 48 of ResNet-50's 53 convs in
plain NCHW (``bench/results/unconstrained_profile.md``). Variants, timed side by side (paired
ratios to dense, median of ``--repeats`` shuffled measurements, as ``bench/unconstrained.py``):

- ``ours_exact``: the plan of ``bench/unconstrained.py``, reordered, exact reads;
- ``ours_aligned``: the same masks with unions rounded up to the block
  (``unconstrained_plan(align=block)``: producers keep a few channels nobody reads) and every
  read padded to the block with zero columns (``rewrite(read_block=block)``);
- ``constrained_matched``: uniform keep ratio with ``ours_exact``'s non-zero parameters
  (counts rounded to 1, the issue's setting);
- ``constrained_matched_aligned``: the same, matched to ``ours_aligned``;
- ``constrained_matched_m8``: matched to ``ours_aligned`` with counts in multiples of the
  block — constrained pruning given the same runtime awareness.

Writes ``bench/results/unconstrained_aligned.{json,md}``.

    python -m bench.unconstrained_aligned [--models resnet50 ...] [--sparsity 0.3]
"""

from __future__ import annotations

import numpy as np
import torch

import fxprune
from bench._common import (
    RESULTS,
    argument_parser,
    commit,
    cpu_backend,
    format_paired,
    paired_ratios,
    random_init,
    rel_err,
    write_results,
)
from bench.unconstrained import MODELS, matched_constrained, nonzero_params, stored_params
from fxprune.rewrite.prune import channel_copies, rewrite

VARIANTS = (
    "ours_exact",
    "ours_aligned",
    "constrained_matched",
    "constrained_matched_aligned",
    "constrained_matched_m8",
)


def run_case(analysis, x, sparsity: float, backend, block: int, repeats: int) -> dict:
    masks = fxprune.magnitude_masks(analysis, sparsity, criterion="l2")
    plan = fxprune.unconstrained_plan(analysis, masks)
    aligned_plan = fxprune.unconstrained_plan(analysis, masks, align=block)
    variants = {"dense": analysis.gm}
    variants["ours_exact"], _ = rewrite(analysis, plan, reads="exact")
    variants["ours_aligned"], _ = rewrite(analysis, aligned_plan, reads="exact", read_block=block)
    keep: dict[str, float] = {}
    for key, ours, multiple in (
        ("constrained_matched", "ours_exact", 1),
        ("constrained_matched_aligned", "ours_aligned", 1),
        ("constrained_matched_m8", "ours_aligned", block),
    ):
        target = nonzero_params(variants[ours])
        keep[key], variants[key] = matched_constrained(analysis, target, multiple)
    err = {}
    with torch.no_grad():
        want = fxprune.masked_forward(analysis, plan, x)
        for k in ("ours_exact", "ours_aligned"):
            err[k] = rel_err(variants[k](x), want)
    ratios, _ = paired_ratios(backend, variants, x, repeats)
    out: dict = {"variants": {}}
    for k in VARIANTS:
        g = variants[k]
        convs = [m for m in g.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 4]
        gathers, slices = channel_copies(g)
        out["variants"][k] = {
            "vs_dense": float(np.median(ratios[k])),
            "vs_dense_runs": ratios[k],
            "nonzero_params": nonzero_params(g),
            "stored_params": stored_params(g),
            "convs_aligned": sum(m.in_channels % block == 0 for m in convs),
            "convs": len(convs),
            "gathers": gathers,
            "slices": slices,
            **({"keep": keep[k]} if k in keep else {}),
            **({"rel_err_vs_oracle": err[k]} if k in err else {}),
        }
    return out


def render(out: dict) -> str:
    lines = [
        "# unconstrained exports aligned to the channel block (ONNX Runtime CPU, batch 1)",
        "",
        f"commit {out['commit']}, block {out['block']}, {out['repeats']} repeats. Cells: latency "
        "× dense (paired, median) and convs whose input count is a multiple of the block. "
        "Ratios: median (range) of per-repeat paired ratios.",
        "",
        "| model | s | " + " | ".join(VARIANTS) + " | exact ÷ matched | aligned ÷ matched "
        "| aligned ÷ matched_aligned | aligned ÷ matched_m8 |",
        "|---" * (len(VARIANTS) + 6) + "|",
    ]
    for name, cases in out["models"].items():
        for s, case in cases.items():
            v = case["variants"]
            cells = [
                f"{v[k]['vs_dense']:.3f}× ({v[k]['convs_aligned']}/{v[k]['convs']}, "
                f"{v[k]['nonzero_params'] / 1e6:.2f}M)"
                for k in VARIANTS
            ]
            ratios = [
                format_paired(v, "ours_exact", "constrained_matched"),
                format_paired(v, "ours_aligned", "constrained_matched"),
                format_paired(v, "ours_aligned", "constrained_matched_aligned"),
                format_paired(v, "ours_aligned", "constrained_matched_m8"),
            ]
            lines.append(f"| {name} | {s} | " + " | ".join(cells + ratios) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argument_parser(
        __doc__, models=MODELS, sparsity=[0.3], out=RESULTS / "unconstrained_aligned.json"
    )
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    backend = cpu_backend()
    block = backend.layout_block()
    out: dict = {"backend": repr(backend), "commit": commit(), "block": block}
    out.update(repeats=args.repeats, models={})
    x = torch.randn(1, 3, 224, 224)
    for name in args.models:
        analysis = fxprune.analyze(random_init(name), x)
        for s in args.sparsity:
            case = run_case(analysis, x, s, backend, block, args.repeats)
            out["models"].setdefault(name, {})[str(s)] = case
            v = case["variants"]
            print(
                f"{name} @ {s}: exact {v['ours_exact']['vs_dense']:.3f} aligned "
                f"{v['ours_aligned']['vs_dense']:.3f} matched "
                f"{v['constrained_matched']['vs_dense']:.3f} matched_m8 "
                f"{v['constrained_matched_m8']['vs_dense']:.3f}",
                flush=True,
            )
            write_results(args.out, out)
    write_results(args.out, out, render(out))
    print(render(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
