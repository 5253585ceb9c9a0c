"""The engine the server runs: the profiler's own, choosing tokens by each request's sampling parameters and
noting the log-probabilities of the tokens it chose for the requests that asked for them."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from recipec.runtime.engine import Engine, Request
from recipec.runtime.lm import sample
from recipec.serve.logprobs import TokenLogprob, of_logits
from recipec.serve.protocol import Sampling

# Below this temperature a request is greedy. Dividing logits by a subnormal temperature overflows to inf,
# and inf - inf is NaN, which picked token 0 (EOS) every time; vLLM uses the same epsilon.
TEMPERATURE_FLOOR = 1e-5


class SamplingEngine(Engine):
    """The profiler's Engine, choosing each row's token by its request's sampling parameters (the rows of a
    step are the requests of the prefill batch or the engine's running rows); scheduling, step records and
    the measured timings stay the engine's own."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._params: dict[int, Sampling] = {}
        # The log-probabilities of the token a step just chose, by request id: written in _pick and taken by
        # the request's on_token callback, which the engine calls on the same thread right after.
        self._logprobs: dict[int, TokenLogprob] = {}

    def submit_sampled(self, prompt: Sequence[int], max_new_tokens: int, sampling: Sampling, **kwargs) -> Request:
        # The engine thread takes new requests under self._cond, an RLock: holding it here until the
        # parameters are registered means no step can see the request before them.
        with self._cond:
            request = self.submit(prompt, max_new_tokens, **kwargs)
            self._params[request.id] = sampling
        return request

    def forget(self, request: Request) -> None:
        self._params.pop(request.id, None)
        self._logprobs.pop(request.id, None)

    def take_logprob(self, request: Request) -> TokenLogprob | None:
        """The log-probabilities of the token `request` was just given, when it asked for them (engine thread)."""
        return self._logprobs.pop(request.id, None)

    def _greedy(self, rows: Sequence[Request]) -> bool:
        """Speculation verifies by argmax and notes no log-probabilities: only for rows that ask for neither."""
        for r in rows:
            params = self._params.get(r.id)
            if params is not None and (params.temperature >= TEMPERATURE_FLOOR or params.logprobs is not None):
                return False
        return True

    def _pick(self, logits, rows: Sequence[Request]) -> np.ndarray:
        return np.array([self._choose(np.asarray(logits[i:i + 1]), r) for i, r in enumerate(rows)], dtype=np.int64)

    def _choose(self, logits: np.ndarray, request: Request) -> int:
        params = self._params.get(request.id)  # None once finished: a static batch still carries the row
        if params is None or params.temperature < TEMPERATURE_FLOOR:
            token = int(logits[0].argmax())
        else:
            token = int(sample(logits, params.temperature, params.top_k, params.top_p, params.rng)[0])
        if params is not None and params.logprobs is not None:
            self._logprobs[request.id] = of_logits(logits[0], token, params.logprobs)
        return token
