"""What a batch of user data is: ``(inputs, target)``, or the inputs alone.

``inputs`` is a tensor or a tuple / list of tensors (one per forward argument). Importance,
normalisation recalibration and fine-tuning read batches the same way through
:func:`split_batch`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["split_batch"]


def split_batch(batch: Any) -> tuple[tuple[Any, ...], Any]:
    """``(inputs as a tuple, target or None)`` of one batch."""
    inputs, target = (
        batch if isinstance(batch, (tuple, list)) and len(batch) == 2 else (batch, None)
    )
    return (tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)), target
