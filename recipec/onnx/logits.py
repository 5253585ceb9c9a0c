"""Next-token distributions from raw logits, shared by quantize's fidelity check and the profiler's quality."""
from __future__ import annotations

import numpy as np


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Over the last axis, in float64: KL between near-identical distributions sums many tiny
    differences that float32 rounding would swamp. Max-shifted so exp cannot overflow."""
    x = x.astype(np.float64, copy=False)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
