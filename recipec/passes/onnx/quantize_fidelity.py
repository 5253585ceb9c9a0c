"""How far a quantized graph drifts from its input graph, with one onnxruntime session alive at a time.

The input graph's logits on the eval windows are computed first and spooled to a scratch file, and its
session is closed before the quantizer runs; the quantized graph's session then reads them back batch by
batch. Scores: mean KL(P_input || P_quantized) of the next-token distributions over every position of every
window, its maximum, and top-1 agreement.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from recipec.onnx import sessions
from recipec.onnx.logits import log_softmax

# Logits per session run (batch x seq x vocab): one run's float32 logits of each graph are held at a time.
EVAL_ELEMENTS = 1 << 24
# Rows of the float64 log-probabilities computed at once (rows x vocab, ~2^21 elements, 16 MiB each).
KL_ELEMENTS = 1 << 21


@dataclass(frozen=True)
class Reference:
    """The input graph's logits, spooled to `path` in the order `batches` yields the windows."""
    path: Path
    tokens: np.ndarray
    per_run: int
    vocab: int
    io: sessions.DecoderIO

    def batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        with open(self.path, "rb") as spool:
            for batch in sessions.windows(self.tokens, self.per_run):
                logits = np.fromfile(spool, np.float32, batch.size * self.vocab)
                yield batch, logits.reshape(*batch.shape, self.vocab)


def reference_logits(source: Path, tokens, spool: Path) -> Reference:
    """Run the input graph over the eval windows once; its session is gone when this returns."""
    tokens = np.asarray(tokens.cpu().numpy() if hasattr(tokens, "cpu") else tokens, dtype=np.int64)
    reference = sessions.session(source)
    io = sessions.DecoderIO.of(reference)
    per_run = max(1, EVAL_ELEMENTS // (int(tokens.shape[1]) * io.vocab))
    with open(spool, "wb") as out:
        for batch in sessions.windows(tokens, per_run):
            sessions.run(reference, io.prefill(batch))["logits"].astype(np.float32, copy=False).tofile(out)
    return Reference(spool, tokens, per_run, io.vocab, io)


def score(candidate, reference: Reference) -> dict[str, float]:
    """Mean and max KL(P_ref || P_q) and top-1 agreement over every position of every eval window."""
    io = sessions.DecoderIO.of(candidate)
    kl_sum = agree = worst = 0.0
    positions = 0
    for batch, ref in reference.batches():
        new = sessions.run(candidate, io.prefill(batch))["logits"]
        ref, new = ref.reshape(-1, reference.vocab), new.reshape(-1, reference.vocab)
        agree += float((ref.argmax(-1) == new.argmax(-1)).sum())
        for kl in _kl_rows(ref, new):
            kl_sum, worst = kl_sum + float(kl.sum()), max(worst, float(kl.max()))
        positions += ref.shape[0]
    return {"kl_mean": kl_sum / positions, "kl_max": worst, "top1_agreement": agree / positions,
            "positions": int(positions)}


def _kl_rows(ref: np.ndarray, new: np.ndarray) -> Iterator[np.ndarray]:
    rows = max(1, KL_ELEMENTS // ref.shape[1])
    for start in range(0, ref.shape[0], rows):
        log_p, log_q = log_softmax(ref[start:start + rows]), log_softmax(new[start:start + rows])
        yield np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)
