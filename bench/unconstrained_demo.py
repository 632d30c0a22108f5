"""Reorder time on the largest CNNs, and compile(coupling=...) constrained vs unconstrained.

Reorder: DenseNet-201 and EfficientNetV2-L at 30% per-layer L2 input sparsity (224², the
``channel_layout`` call alone). Compile: ResNet-18 to 0.5× dense on ONNX Runtime CPU, both
couplings sharing one cold latency cache. Writes ``bench/results/unconstrained_compile_demo.json``.

    python -m bench.unconstrained_demo
"""

from __future__ import annotations

import json
import tempfile
import time

import torch
import torchvision

import fxprune
from bench._common import RESULTS, argument_parser, write_results
from fxprune.rewrite.api import ExportSpec
from fxprune.unconstrained.layout import channel_layout


def main(argv: list[str] | None = None) -> int:
    argument_parser(__doc__).parse_args(argv)
    out = {}
    x = torch.randn(1, 3, 224, 224)
    for name in ["densenet201", "efficientnet_v2_l"]:
        m = torchvision.models.get_model(name, weights=None).eval()
        a = fxprune.analyze(m, x)
        plan = fxprune.unconstrained_plan(a, fxprune.magnitude_masks(a, 0.3))
        t = time.perf_counter()
        lay = channel_layout(a, plan, a.spaces.keep_units(plan.kept))
        out[f"reorder_s_{name}"] = time.perf_counter() - t
        out[f"orders_{name}"] = dict(
            groups=len(lay.orders),
            sets=sum(o.sets for o in lay.orders),
            contiguous=sum(o.contiguous for o in lay.orders),
            max_channels=max(o.channels for o in lay.orders),
        )
        print(name, out[f"reorder_s_{name}"], out[f"orders_{name}"], flush=True)
    cache = tempfile.mkdtemp()
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    for coupling in ["constrained", "unconstrained"]:
        unconstrained = fxprune.UnconstrainedConfig() if coupling == "unconstrained" else None
        config = fxprune.CompileConfig(unconstrained=unconstrained, cache=cache, progress=False)
        r = fxprune.compile(model, 0.5, example_inputs=x, config=config)
        s = r.summary()
        s["rounds_detail"] = [
            {
                "predicted_ms": rr.predicted_ms,
                "measured_ms": rr.measured_ms,
                "dense_ms": rr.dense_ms,
                "met": rr.met,
            }
            for rr in r.rounds
        ]
        if coupling == "unconstrained":
            s["consumers"] = len(r.plan.consumers)
            reads = ExportSpec.from_notes(r.plan.notes).reads or {}
            s["reads"] = {
                k: list(reads.values()).count(k) for k in ("slice", "gather", "span", "full")
            }
        s["timings"] = r.timings
        out[coupling] = s
        print(coupling, json.dumps(s, default=str)[:1500], flush=True)
    write_results(RESULTS / "unconstrained_compile_demo.json", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
