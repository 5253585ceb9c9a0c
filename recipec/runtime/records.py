"""What the engine records as it serves: one record per request, one per model step. The profile layer
computes every serving metric from these (recipec.profile.metrics)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RequestRecord:
    """One request as the client saw it; times in seconds on the engine's clock."""
    arrival: float
    token_times: list[float]
    n_in: int
    cancelled: bool = False

    @property
    def n_out(self) -> int:
        return len(self.token_times)


@dataclass
class StepRecord:
    """One model call. `ctx` holds, for each row that produced a token, the sequence length the
    call attended over (prompt length for prefill, tokens in cache + 1 for decode); `padded_len` is
    the cache length the call actually read, padding included."""
    kind: str  # "prefill" or "decode"
    start: float
    end: float
    ctx: list[int]
    rows: int  # rows computed, including finished rows a static batch still carries
    padded_len: int
    session_seconds: float | None = None  # of which onnxruntime's run (None: a model that does not say)

    @property
    def seconds(self) -> float:
        return self.end - self.start
