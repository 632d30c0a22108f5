"""ONNX Runtime backend: export the module to ONNX in memory and time ``InferenceSession.run``.

This is the default deployment runtime, so it is where latency tables are measured. The module
is exported with constant folding, so BN folds into the preceding conv and ORT fuses the
activation, exactly as a deployed model would run.

Exporter: torch 2.14 still ships the TorchScript-based exporter (``dynamo=False``). It is
deprecated but several times faster per export than the dynamo exporter and gives the same
fused graph for conv/linear units, which matters when a table needs hundreds of exports. If it
fails or disappears we fall back to the dynamo exporter.

Session options are set explicitly (never left to ORT's defaults, which depend on the host) and
are all part of :meth:`OnnxRuntimeBackend.identity`, so cached figures cannot be mixed up.
onnxruntime is imported in this module only.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from fxprune.backends.base import (
    BackendUnavailable,
    MeasureConfig,
    Measurement,
    available_cpus,
    check_float32_inputs,
    eval_mode,
    host_identity,
    identity_label,
    time_callable,
    time_interleaved,
)

__all__ = [
    "LAYOUT_OPS",
    "OPSET",
    "OnnxRuntimeBackend",
    "batch_size",
    "export_to_bytes",
    "flatten_outputs",
]

logger = logging.getLogger("fxprune")

#: Layout conversions ORT inserts around blocked (NCHWc) kernels; a whole model has them only
#: at its ends, so :meth:`OnnxRuntimeBackend.measure_kernels` leaves them out of a unit's time.
LAYOUT_OPS = ("ReorderInput", "ReorderOutput")

#: ONNX opset used for every export (both exporters support it; the dynamo one needs >= 18).
OPSET = 18

_CPU = "CPUExecutionProvider"
_CUDA = "CUDAExecutionProvider"
_PROVIDER_ALIASES = {"cpu": _CPU, "cuda": _CUDA, _CPU.lower(): _CPU, _CUDA.lower(): _CUDA}

_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def _input_names(n: int) -> list[str]:
    return [f"input_{i}" for i in range(n)]


def flatten_outputs(outputs: Any) -> list[tuple[str, torch.Tensor]]:
    """A model's outputs as ``(name, tensor)`` pairs, in the order the ONNX exporters emit them.

    A tensor is ``output``; tuple and list items ``output_0``, ``output_1``, …; dict values
    are named by their keys (in insertion order); nested containers join the names with ``.``.

    Raises:
        TypeError: for an output that is not a tensor (ONNX outputs are tensors).
    """
    return _flatten(outputs, None)


def _flatten(value: Any, name: str | None) -> list[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        return [(name or "output", value)]
    if isinstance(value, dict):
        items = [(str(k) if name is None else f"{name}.{k}", v) for k, v in value.items()]
    elif isinstance(value, (tuple, list)):
        items = [(f"output_{i}" if name is None else f"{name}.{i}", v) for i, v in enumerate(value)]
    else:
        raise TypeError(
            f"model output {name or 'output'!r} is a {type(value).__name__}; ONNX outputs must "
            "be tensors, or dicts, tuples and lists of them: return tensors from forward"
        )
    return [pair for key, item in items for pair in _flatten(item, key)]


def _batch_axes(
    names: Sequence[str], tensors: Sequence[torch.Tensor], batch: int
) -> dict[str, dict[int, str]]:
    """Dim 0 is the symbolic ``batch`` axis for every value whose dim 0 has the batch size."""
    return {
        n: {0: "batch"} for n, t in zip(names, tensors, strict=True) if t.ndim and len(t) == batch
    }


def batch_size(example_inputs: Sequence[torch.Tensor]) -> int | None:
    """The batch size: dim 0 of the first input of rank >= 1 (None when there is none)."""
    return next((len(t) for t in example_inputs if t.ndim), None)


def _export_torchscript(
    module: torch.nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    outputs: list[tuple[str, torch.Tensor]] | None,
    dynamic_batch: bool,
) -> bytes:
    buf = io.BytesIO()
    input_names = _input_names(len(example_inputs))
    output_names = None if outputs is None else [n for n, _ in outputs]
    dynamic_axes = None
    batch = batch_size(example_inputs)
    if dynamic_batch and outputs is not None and batch is not None:
        dynamic_axes = _batch_axes(input_names, example_inputs, batch)
        dynamic_axes |= _batch_axes([n for n, _ in outputs], [t for _, t in outputs], batch)
    with warnings.catch_warnings():
        # The exporter announces its own deprecation on every call; we chose it knowingly.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(
            module,
            example_inputs,
            buf,
            dynamo=False,
            opset_version=OPSET,
            do_constant_folding=True,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
        )
    return buf.getvalue()


def _export_dynamo(
    module: torch.nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    outputs: list[tuple[str, torch.Tensor]] | None,
    dynamic_batch: bool,
) -> bytes:
    dynamic_shapes = None
    batch = batch_size(example_inputs)
    if dynamic_batch and batch is not None:
        dim = torch.export.Dim.DYNAMIC
        dynamic_shapes = tuple(
            {0: dim} if t.ndim and len(t) == batch else None for t in example_inputs
        )
    program = torch.onnx.export(
        module,
        example_inputs,
        dynamo=True,
        opset_version=OPSET,
        optimize=True,  # constant folding and redundant-op elimination
        input_names=_input_names(len(example_inputs)),
        output_names=None if outputs is None else [n for n, _ in outputs],
        dynamic_shapes=dynamic_shapes,
        verbose=False,
    )
    if program is None:  # pragma: no cover - only when f= is given
        raise RuntimeError("torch.onnx.export(dynamo=True) returned no program")
    return program.model_proto.SerializeToString()


def export_to_bytes(
    module: torch.nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    *,
    named_outputs: bool = False,
    dynamic_batch: bool = False,
) -> bytes:
    """Export ``module`` (in eval mode, constant-folded) to a serialised ONNX model.

    The caller's module is left as it was (training flags restored). Inputs are named
    ``input_0``, ``input_1``, … in the order of ``example_inputs``.

    Args:
        named_outputs: name the outputs as :func:`flatten_outputs` does (runs the module once).
        dynamic_batch: make dim 0 a symbolic ``batch`` axis in every input and output whose
            dim 0 has the batch size (:func:`batch_size`), so the file runs at any batch size
            (implies ``named_outputs``). Latency figures are taken with static shapes, the
            default, as the tables were.
    """
    check_float32_inputs(example_inputs)
    with eval_mode(module), torch.no_grad():
        outputs = None
        if named_outputs or dynamic_batch:
            outputs = flatten_outputs(module(*example_inputs))
        try:
            return _export_torchscript(module, example_inputs, outputs, dynamic_batch)
        except Exception as legacy_error:
            logger.info(
                "the TorchScript exporter failed on %s (%s: %s); trying the dynamo exporter",
                type(module).__name__,
                type(legacy_error).__name__,
                str(legacy_error).splitlines()[0] if str(legacy_error) else "",
            )
            try:
                return _export_dynamo(module, example_inputs, outputs, dynamic_batch)
            except Exception as dynamo_error:
                raise RuntimeError(
                    f"could not export {type(module).__name__} to ONNX: the TorchScript "
                    f"exporter failed ({legacy_error!r}) and so did the dynamo exporter "
                    f"({dynamo_error!r})"
                ) from dynamo_error


def _resolve_provider(provider: str) -> str:
    available = ort.get_available_providers()
    cuda_here = _CUDA in available and torch.cuda.is_available()
    if provider == "auto":
        return _CUDA if cuda_here else _CPU
    name = _PROVIDER_ALIASES.get(provider.lower())
    if name is None:
        raise ValueError(f"unknown provider {provider!r}; use 'auto', 'cpu' or 'cuda'")
    if name == _CUDA and not cuda_here:
        why = (
            "this onnxruntime build has no CUDAExecutionProvider "
            f"(available: {', '.join(available)}); `pip install onnxruntime-gpu` "
            "(in place of onnxruntime)"
            if _CUDA not in available
            else "torch sees no CUDA device"
        )
        raise BackendUnavailable(
            f"ONNX Runtime CUDA provider requested but unavailable: {why}. It needs "
            "onnxruntime-gpu and a CUDA device; use provider='cpu' or 'auto' to measure on CPU."
        )
    return name


class OnnxRuntimeBackend:
    """Times a module as an ONNX Runtime session with explicit, recorded session options.

    Args:
        provider: ``"auto"`` (CUDA when onnxruntime-gpu and a CUDA device are present, else
            CPU), ``"cpu"`` or ``"cuda"`` (raises :class:`BackendUnavailable` if absent).
        threads: intra-op threads; ``None`` means the CPUs this process may use, written
            down explicitly so the identity never depends on ORT's own default.
        graph_optimization_level: ``"disable" | "basic" | "extended" | "all"``.
        allow_spinning: let idle intra-op threads spin-wait (ORT's default). Off by default:
            spinning threads compete for the cores the timed session needs, so on a host
            with few cores it can slow a model even alone, and the idle pools of other live
            sessions spinning beside a timed one inflate its figure, which ruins side-by-side
            timing. Deploy with the setting you measured.
    """

    def __init__(
        self,
        provider: str = "auto",
        threads: int | None = None,
        graph_optimization_level: str = "all",
        allow_spinning: bool = False,
    ) -> None:
        if graph_optimization_level not in _OPT_LEVELS:
            raise ValueError(
                f"graph_optimization_level must be one of {sorted(_OPT_LEVELS)}, "
                f"got {graph_optimization_level!r}"
            )
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {threads}")
        self.provider = _resolve_provider(provider)
        self.threads = threads if threads is not None else available_cpus()
        self.graph_optimization_level = graph_optimization_level
        self.allow_spinning = allow_spinning
        self._layout_block: int | None = None  # probed on first use (layout_block)

    def __repr__(self) -> str:
        return (
            f"OnnxRuntimeBackend(provider={self.provider!r}, threads={self.threads}, "
            f"graph_optimization_level={self.graph_optimization_level!r}, "
            f"allow_spinning={self.allow_spinning})"
        )

    def identity(self) -> dict[str, str]:
        """Runtime, provider, session options, exporter, host and dtype: all change figures."""
        ident = {
            "runtime": "onnxruntime",
            "runtime_version": ort.__version__,
            "provider": self.provider,
            "intra_op_threads": str(self.threads),
            "inter_op_threads": "1",
            "execution_mode": "sequential",
            "graph_optimization_level": self.graph_optimization_level,
            "allow_spinning": str(self.allow_spinning),
            "exporter": f"torch-{torch.__version__}-opset{OPSET}",
            "dtype": "float32",
            **host_identity(),
        }
        if self.provider == _CUDA:
            ident["device"] = f"cuda:{torch.cuda.get_device_name(0)}"
        else:
            ident["device"] = f"cpu:{ident['cpu_model']}"
        return ident

    def session_options(self) -> ort.SessionOptions:
        """The session options every session of this backend uses."""
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = _OPT_LEVELS[self.graph_optimization_level]
        so.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if self.allow_spinning else "0"
        )
        so.log_severity_level = 3  # errors only: ORT's warnings would flood a table build
        return so

    def session(self, onnx_bytes: bytes) -> ort.InferenceSession:
        """An inference session for ``onnx_bytes`` with this backend's provider and options."""
        return ort.InferenceSession(
            onnx_bytes, sess_options=self.session_options(), providers=[self.provider]
        )

    def optimized_ops(self, onnx_bytes: bytes) -> list[str]:
        """The op types of the graph this backend's optimizer makes of ``onnx_bytes``.

        Blocked-layout ops come out with their layout conversions (``ReorderInput`` /
        ``ReorderOutput``), so this shows where the runtime changes layout.
        """
        import onnx  # only needed here and in export checks

        with tempfile.TemporaryDirectory(prefix="fxprune-ort-opt-") as tmp:
            so = self.session_options()
            so.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
            ort.InferenceSession(onnx_bytes, sess_options=so, providers=[self.provider])
            return [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]

    def layout_block(self) -> int:
        """The channel block of the runtime's blocked conv layout (NCHWc); 1 when it has none.

        ORT's CPU optimizer runs a conv in NCHWc when its input has at least one block of
        channels; the block follows the CPU's vector width (e.g. 8 or 16 channels), so it is
        asked for, never assumed. A tensor narrower than a block makes the runtime leave the
        layout: a ``ReorderOutput`` back to NCHW before the consumer, which then runs a
        slower NCHW-input kernel. A unit timed alone cannot show that cost (its own input is
        NCHW anyway), but a whole model pays it, so pruning a layer below the block can make
        the model *slower* while the tables predict no change. So the probe asks the
        optimizer itself: the smallest power of two ``c`` for which a ``c → c`` 1×1 conv gets
        its input reordered into blocks. Cached per backend.
        """
        if self._layout_block is not None:
            return self._layout_block
        block = 1
        if self.provider == _CPU and self.graph_optimization_level == "all":
            for c in (4, 8, 16, 32, 64):
                conv = torch.nn.Conv2d(c, c, 1).eval()
                onnx_bytes = export_to_bytes(conv, (torch.zeros(1, c, 8, 8),))
                if "ReorderInput" in self.optimized_ops(onnx_bytes):
                    block = c
                    break
        self._layout_block = block
        return block

    def run(
        self, onnx_bytes: bytes, inputs: tuple[torch.Tensor | np.ndarray, ...]
    ) -> list[np.ndarray]:
        """Run an exported model once and return its outputs (for numerical checks)."""
        sess = self.session(onnx_bytes)
        return [np.asarray(o) for o in sess.run(None, _feeds(sess, inputs))]

    def measure(
        self,
        module: torch.nn.Module,
        example_inputs: tuple[torch.Tensor, ...],
        config: MeasureConfig | None = None,
    ) -> Measurement:
        """Export ``module``, open a session, and time ``session.run`` on the example inputs."""
        sess = self.session(export_to_bytes(module, example_inputs))
        feeds = _feeds(sess, example_inputs)
        label = identity_label(self.identity())
        what = type(module).__name__
        run_once: Callable[[], object] = (
            _cuda_runner(sess, feeds) if self.provider == _CUDA else partial(sess.run, None, feeds)
        )
        return time_callable(run_once, config, backend_id=label, label=what)

    def measure_sessions(
        self,
        module: torch.nn.Module,
        example_inputs: tuple[torch.Tensor, ...],
        config: MeasureConfig | None = None,
        sessions: int = 3,
    ) -> Measurement:
        """Like :meth:`measure`, over ``sessions`` fresh sessions of one export.

        Figures of one model differ from session to session (buffer placement, thread
        placement on a shared host); runs go round the sessions and the median over all of
        them is reported, so one unlucky session cannot make a reference.
        """
        return self.measure_interleaved([module], example_inputs, config, sessions)[0]

    def measure_interleaved(
        self,
        modules: Sequence[torch.nn.Module],
        example_inputs: tuple[torch.Tensor, ...],
        config: MeasureConfig | None = None,
        sessions: int = 3,
    ) -> list[Measurement]:
        """Time several modules side by side, run by run (:func:`time_interleaved`).

        A ratio of two models' latencies measured minutes apart on a shared host is off by
        the host's drift between the two, and even alternating whole sessions lets a burst of
        interference hit one model only. So every module gets ``sessions`` fresh sessions of
        one export, and each repeat runs every session of every module once; per module the
        median over all its runs is reported.
        """
        exports = [export_to_bytes(m, example_inputs) for m in modules]
        label = identity_label(self.identity())
        runners: list[list[Callable[[], object]]] = []
        keep = []  # the sessions must outlive their runners
        for onnx_bytes in exports:
            per = []
            for _ in range(max(1, sessions)):
                sess = self.session(onnx_bytes)
                feeds = _feeds(sess, example_inputs)
                keep.append(sess)
                per.append(
                    _cuda_runner(sess, feeds)
                    if self.provider == _CUDA
                    else partial(sess.run, None, feeds)
                )
            runners.append(per)
        return time_interleaved(runners, config, backend_id=label)

    def _profile(
        self,
        module: torch.nn.Module,
        example_inputs: tuple[torch.Tensor, ...],
        config: MeasureConfig,
    ) -> list[dict]:
        """Kernel events of ``warmup + repeats`` runs of one profiled session."""
        onnx_bytes = export_to_bytes(module, example_inputs)
        with tempfile.TemporaryDirectory(prefix="fxprune-ort-prof-") as tmp:
            so = self.session_options()
            so.enable_profiling = True
            so.profile_file_prefix = os.path.join(tmp, "profile")
            sess = ort.InferenceSession(onnx_bytes, sess_options=so, providers=[self.provider])
            feeds = _feeds(sess, example_inputs)
            for _ in range(config.warmup + config.repeats):
                sess.run(None, feeds)
            with open(sess.end_profiling(), encoding="utf-8") as f:
                return _kernel_events(json.load(f))

    def profile_kernels(
        self,
        module: torch.nn.Module,
        example_inputs: tuple[torch.Tensor, ...],
        config: MeasureConfig | None = None,
        *,
        exclude: tuple[str, ...] = LAYOUT_OPS,
    ) -> list[dict[str, Any]]:
        """Per compute kernel of one session, in execution order: what ORT ran and its time.

        Each entry: ``op`` (ORT op after fusion, e.g. ``"Conv"``), ``output_shape``,
        ``input_shapes`` and ``median_ms`` over the timed runs. Ops in ``exclude`` (layout
        conversions, by default) are left out. Used to see what a layer costs *inside* the
        whole model (see :mod:`fxprune.latency.in_model`).
        """
        config = config or MeasureConfig()
        events = self._profile(module, example_inputs, config)
        per: dict[str, list[dict]] = {}
        for e in events:
            if e.get("args", {}).get("op_name") not in exclude:
                per.setdefault(e["name"], []).append(e)
        out = []
        for runs in per.values():
            args = runs[0]["args"]
            out.append(
                {
                    "op": args.get("op_name", ""),
                    "output_shape": [
                        next(iter(t.values())) for t in args.get("output_type_shape", [])
                    ],
                    "input_shapes": [
                        next(iter(t.values())) for t in args.get("input_type_shape", [])
                    ],
                    "median_ms": float(
                        np.median([float(r["dur"]) / 1e3 for r in runs[-config.repeats :]])
                    ),
                }
            )
        return out

    def measure_kernels(
        self,
        module: torch.nn.Module,
        example_inputs: tuple[torch.Tensor, ...],
        config: MeasureConfig | None = None,
        *,
        exclude: tuple[str, ...] = LAYOUT_OPS,
    ) -> Measurement:
        """Time the compute kernels of ``module`` alone, from ORT's own per-node profile.

        A unit run on its own pays for layout conversions (``ReorderInput`` /
        ``ReorderOutput`` to and from the blocked NCHWc layout) that a whole model pays only
        at its ends; summed over units they overstate a model. Each sample is the sum of the
        kernel times of one run's nodes whose op is not in ``exclude``. One round; ``stable``
        says whether the spread met the limit.
        """
        config = config or MeasureConfig()
        per_node: dict[str, list[float]] = {}
        for e in self._profile(module, example_inputs, config):
            if e.get("args", {}).get("op_name") in exclude:
                continue
            per_node.setdefault(e["name"], []).append(float(e["dur"]) / 1e3)
        if not per_node:
            raise RuntimeError(f"ORT profile of {type(module).__name__} has no kernel events")
        runs = np.sum([d[-config.repeats :] for d in per_node.values()], axis=0)
        p10, median, p90 = (float(v) for v in np.percentile(runs, [10, 50, 90]))
        spread = (p90 - p10) / median if median > 0 else float("inf")
        return Measurement(
            median_ms=median,
            p10_ms=p10,
            p90_ms=p90,
            rel_spread=spread,
            samples=tuple(float(r) for r in runs),
            stable=spread <= config.max_rel_spread,
            backend_id=identity_label(self.identity()) + "/kernels",
        )


def _kernel_events(events: list[dict]) -> list[dict]:
    return [
        e
        for e in events
        if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time")
    ]


def _feeds(
    sess: ort.InferenceSession, inputs: tuple[torch.Tensor | np.ndarray, ...]
) -> dict[str, np.ndarray]:
    """Map inputs to the session's input names (the exporter may drop unused inputs)."""
    by_name = {
        name: (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x))
        for name, x in zip(_input_names(len(inputs)), inputs, strict=True)
    }
    wanted = [i.name for i in sess.get_inputs()]
    missing = [n for n in wanted if n not in by_name]
    if missing:
        raise ValueError(
            f"model expects inputs {wanted} but got {len(inputs)} input(s); missing {missing}"
        )
    return {n: np.ascontiguousarray(by_name[n]) for n in wanted}


def _cuda_runner(
    sess: ort.InferenceSession, feeds: dict[str, np.ndarray]
) -> Callable[[], None]:  # pragma: no cover - needs a GPU
    """A callable timing device-resident inputs/outputs, so PCIe copies stay out of the figure."""
    binding = sess.io_binding()
    for name, arr in feeds.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(arr, "cuda", 0))
    for out in sess.get_outputs():
        binding.bind_output(out.name, "cuda", 0)

    def run() -> None:
        sess.run_with_iobinding(binding)
        binding.synchronize_outputs()

    return run
