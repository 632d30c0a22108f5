"""An independent check of a pruned model's latency: plain ONNX Runtime, nothing of fxprune's.

Both models are exported with ``torch.onnx.export`` and run in plain ``InferenceSession``\\ s
(default graph optimisations, ``intra_op_num_threads`` threads, one inter-op thread, thread
spinning off), interleaved round by round with the dense model on one input; the figure is the
median over rounds of the per-round ratio of medians. It shares no code with fxprune's backends,
cache or tables, so a bug there cannot make a budget look met.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

__all__ = ["independent_ratio"]


def _export(model: nn.Module, x: torch.Tensor, path: Path) -> None:
    model = model.eval()
    try:
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17)
    except Exception:  # the TorchScript exporter cannot take every graph; the dynamo one may
        torch.onnx.export(model, (x,), str(path), dynamo=True)


def _session(path: Path, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _time(sess: ort.InferenceSession, feed: dict, n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3


def independent_ratio(
    pruned: nn.Module,
    dense: nn.Module,
    x: torch.Tensor,
    *,
    threads: int = 2,
    rounds: int = 15,
    min_seconds: float = 3.0,
) -> dict[str, float]:
    """Pruned / dense latency on plain ORT, measured interleaved; with both medians (ms)."""
    with tempfile.TemporaryDirectory(prefix="fxprune-verify-") as tmp:
        paths = [Path(tmp) / "pruned.onnx", Path(tmp) / "dense.onnx"]
        with torch.no_grad():
            for m, p in zip((pruned, dense), paths, strict=True):
                _export(m, x, p)
        sessions = [_session(p, threads) for p in paths]
        feeds = [{s.get_inputs()[0].name: x.numpy()} for s in sessions]
        for s, f in zip(sessions, feeds, strict=True):  # warm-up, and the runs per round
            _time(s, f, 5)
        t = time.perf_counter()
        _time(sessions[1], feeds[1], 5)
        per_run = max((time.perf_counter() - t) / 5, 1e-5)
        n = max(10, int(min_seconds / rounds / per_run))
        ratios, p_ms, d_ms = [], [], []
        for r in range(rounds):
            order = (0, 1) if r % 2 == 0 else (1, 0)
            got = {i: _time(sessions[i], feeds[i], n) for i in order}
            p_ms.append(got[0])
            d_ms.append(got[1])
            ratios.append(got[0] / got[1])
    return {
        "ratio": float(np.median(ratios)),
        "pruned_ms": float(np.median(p_ms)),
        "dense_ms": float(np.median(d_ms)),
        "rounds": rounds,
        "runs_per_round": n,
    }
