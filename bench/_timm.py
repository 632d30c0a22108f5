"""The timm zoo for the benches: which models, at which input size, CNN or not, and a stand-in runtime.

Selection is deterministic and recorded in each bench's JSON:

* a *family* is a timm model module (``timm.list_modules()``: ``resnet``, ``efficientnet``,
  ``vision_transformer``...);
* timm's ``test_*`` models (tiny smoke-test variants) are left out;
* within a family, models are ranked by parameter count (counted on the ``meta`` device, so
  nothing is allocated) and the smallest are taken: :data:`PER_CNN_FAMILY` of each CNN family,
  :data:`PER_OTHER_FAMILY` of each other family. CNN families come first in the list.
* the kind of a family (CNN, hybrid, transformer) is a fixed table (:data:`CNN_FAMILIES`,
  :data:`HYBRID_FAMILIES`); every other family counts as a transformer / MLP model.

The input is the model's default ``input_size`` (its pretrained config) with each spatial side
capped at :data:`MAX_SIDE` where the model runs at the capped size (else its own size), random
weights (``pretrained=False``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from fxprune.backends import MeasureConfig, Measurement

__all__ = [
    "CNN_FAMILIES",
    "HYBRID_FAMILIES",
    "MacsBackend",
    "create",
    "family_of",
    "input_shape",
    "kind_of",
    "select_models",
]

#: timm modules whose models are convolutional networks (no attention, no token mixing MLPs)
CNN_FAMILIES = frozenset(
    {
        "byobnet", "convnext", "cspnet", "densenet", "dla", "dpn", "efficientnet", "fasternet",
        "ghostnet", "hardcorenas", "hgnet", "hrnet", "inception_next", "inception_resnet_v2",
        "inception_v3", "inception_v4", "lcnetv2", "mobilenetv3", "nasnet", "nfnet", "pnasnet",
        "rdnet", "regnet", "repghost", "repvit", "res2net", "resnest", "resnet", "resnetv2",
        "rexnet", "selecsls", "senet", "sknet", "starnet", "tresnet", "vgg", "vovnet",
        "xception", "xception_aligned", "convmixer", "mambaout",
    }
)  # fmt: skip
#: timm modules mixing convolutions and attention
HYBRID_FAMILIES = frozenset(
    {
        "byoanet", "coat", "convit", "cpubone", "edgenext", "efficientformer",
        "efficientformer_v2", "efficientvim", "efficientvit_mit", "efficientvit_msra", "fastvit",
        "iformer", "levit", "lowformer", "maxxvit", "metaformer", "mobilenetv5", "mobilevit",
        "nextvit", "shvit", "swiftformer", "tiny_vit", "visformer", "vision_transformer_hybrid",
        "csatv2", "gcvit", "vitamin",
    }
)  # fmt: skip

PER_CNN_FAMILY = 3
PER_OTHER_FAMILY = 1
MAX_SIDE = 224


def kind_of(family: str) -> str:
    """ "cnn", "hybrid" or "transformer" (everything else: ViTs, MLP-mixers...)."""
    if family in CNN_FAMILIES:
        return "cnn"
    return "hybrid" if family in HYBRID_FAMILIES else "transformer"


def family_of(name: str) -> str:
    """The timm module that defines model ``name``."""
    import timm

    for module in timm.list_modules():
        if name in timm.list_models(module=module):
            return module
    raise KeyError(f"{name!r} is not a timm model")


def _params_on_meta(name: str) -> float:
    import timm

    try:
        with torch.device("meta"):
            m = timm.create_model(name, pretrained=False)
        return float(sum(p.numel() for p in m.parameters()))
    except Exception:  # a model that cannot be built on meta sorts last in its family
        return float("inf")


def select_models(
    per_cnn: int = PER_CNN_FAMILY, per_other: int = PER_OTHER_FAMILY
) -> list[tuple[str, str]]:
    """``(model, family)`` pairs: the smallest models of each family, CNN families first."""
    import timm

    picks: list[tuple[str, str]] = []
    later: list[tuple[str, str]] = []
    for family in sorted(timm.list_modules()):
        names = [n for n in timm.list_models(module=family) if not n.startswith("test_")]
        k = per_cnn if kind_of(family) == "cnn" else per_other
        ranked = sorted(names, key=lambda n: (_params_on_meta(n), n))[:k]
        (picks if kind_of(family) == "cnn" else later).extend((n, family) for n in ranked)
    return picks + later


def input_shape(name: str) -> tuple[int, ...]:
    """``(1, C, H, W)``: the model's default input size, each side capped at :data:`MAX_SIDE`,
    unless the model runs at its own size but not at the capped one (halonet's feature maps
    must divide into its attention blocks: 256² works, 224² does not); then its own."""
    import timm

    cfg = timm.get_pretrained_cfg(name, allow_unregistered=True)
    c, h, w = (cfg.input_size if cfg is not None and cfg.input_size else (3, 224, 224))[-3:]
    own, capped = (1, c, h, w), (1, c, min(h, MAX_SIDE), min(w, MAX_SIDE))
    if capped != own and not _runs_on_meta(name, capped) and _runs_on_meta(name, own):
        return own
    return capped


def _runs_on_meta(name: str, shape: tuple[int, ...]) -> bool:
    """Model ``name`` builds and runs at ``shape`` on the meta device (nothing is computed)."""
    try:
        with torch.device("meta"), torch.no_grad():
            create(name, shape).eval()(torch.empty(shape))
    except Exception:  # any failure: the size (or meta) does not work for this model
        return False
    return True


def create(name: str, shape: Sequence[int]) -> nn.Module:
    """Model ``name`` with random weights, built for ``shape`` where it takes an image size."""
    import timm

    try:
        return timm.create_model(name, pretrained=False, img_size=tuple(shape[-2:]))
    except TypeError:  # a model without an img_size argument
        return timm.create_model(name, pretrained=False)


class _CountAttention(TorchFunctionMode):
    """Adds the MACs of every ``F.scaled_dot_product_attention`` call to ``macs[0]``:
    ``q``'s positions × keys × (query width + value width), i.e. ``QKᵀ`` and ``AV``."""

    def __init__(self, macs: list[int]) -> None:
        super().__init__()
        self.macs = macs

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            named = {**dict(zip(("query", "key", "value"), args, strict=False)), **kwargs}
            q, k, v = named["query"], named["key"], named["value"]
            self.macs[0] += q.shape[:-1].numel() * k.shape[-2] * (q.shape[-1] + v.shape[-1])
        return func(*args, **kwargs)


class MacsBackend:
    """A deterministic stand-in runtime: milliseconds proportional to conv/linear/attention
    MACs, plus a constant per call.

    It never times anything, so compile's budget loop can run over a whole zoo quickly and
    reproducibly; a real runtime's figures come from ``bench.compile``.
    """

    MS_PER_GMAC = 10.0
    CONSTANT_MS = 0.05

    def identity(self) -> dict[str, str]:
        return {"runtime": "macs", "device": "none", "version": "1"}

    def measure(
        self,
        module: nn.Module,
        example_inputs: tuple[torch.Tensor, ...],
        config: MeasureConfig | None = None,
    ) -> Measurement:
        macs = [0]

        def count(mod: nn.Module, _inp: object, out: torch.Tensor) -> None:
            if isinstance(mod, nn.Linear):
                macs[0] += out.numel() * mod.in_features
            elif isinstance(out, torch.Tensor):
                k = mod.weight[0].numel()  # in/groups × kernel
                macs[0] += out.numel() * k

        hooks = [
            m.register_forward_hook(count)
            for m in module.modules()
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
        ]
        try:
            with torch.no_grad(), _CountAttention(macs):
                module.eval()(*example_inputs)
        finally:
            for h in hooks:
                h.remove()
        ms = self.CONSTANT_MS + self.MS_PER_GMAC * macs[0] / 1e9
        return Measurement(ms, ms, ms, 0.0, (ms,), True, "macs#0")
