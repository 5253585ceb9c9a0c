"""Run by tests/peer_envs.run_probe inside another environment; prints one JSON line.

    python tests/ort_probe.py load GRAPH                  -> {"onnxruntime", "error": null or onnxruntime's message}
    python tests/ort_probe.py compare REFERENCE CANDIDATE -> {"onnxruntime", "error", "diffs", "batched_chunk_error"}
    python tests/ort_probe.py logits GRAPH OUT.npy        -> {"onnxruntime", "error"}; OUT.npy: prefill logits
    python tests/ort_probe.py slots REFERENCE_DIR SHARED_DIR -> {"onnxruntime", "error", "tokens", "expected"}
The graphs are compared with recipec.onnx.sessions' own check (the one fuse runs), in this onnxruntime; a
shared-buffer variant generates through recipec's slot runtime, against the reference generating alone.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime

from recipec.errors import PassError
from recipec.onnx import sessions


def prefill_logits(session) -> np.ndarray:
    """Logits of the seeded left-padded prefill batch that the fuse check starts with."""
    prefill, _, _ = sessions.seeded_cases(sessions.DecoderIO.of(session), seed=0)
    return sessions.run(session, prefill)["logits"]


PROMPTS, NEW_TOKENS = [[5, 6, 7, 8, 9], [11, 12], [20, 21, 22]], 8


def slot_tokens(reference_dir: str, shared_dir: str) -> dict:
    """Greedy tokens of a right-padded batch in one preallocated buffer, and of each prompt alone."""
    from recipec.runtime import lm
    from recipec.runtime.slots import SlotLM

    reference = lm.load(reference_dir, device="cpu")
    expected = [reference.generate([p], NEW_TOKENS, ignore_eos=True).tokens[0] for p in PROMPTS]
    slots = SlotLM(lm.load(shared_dir, device="cpu"), slots=4)
    logits, batch = slots.prefill(PROMPTS)
    tokens = [[int(t)] for t in logits.argmax(-1)]
    for _ in range(NEW_TOKENS - 1):
        logits, batch = slots.decode([row[-1] for row in tokens], batch)
        for row, token in zip(tokens, logits.argmax(-1)):
            row.append(int(token))
    return {"tokens": tokens, "expected": expected}


def main(mode: str, *paths: str) -> dict:
    answer = {"onnxruntime": onnxruntime.__version__, "error": None}
    if mode == "slots":
        try:
            return {**answer, **slot_tokens(*paths)}
        except PassError as exc:
            return {**answer, "error": str(exc)}
    try:
        loaded = [sessions.session(Path(path)) for path in paths[:2] if path.endswith(".onnx")]
    except PassError as exc:
        return {**answer, "error": str(exc)}
    if mode == "compare":
        answer["diffs"] = sessions.max_logit_diffs(*loaded, seed=0, batched_chunk=False)
        try:
            sessions.max_logit_diffs(*loaded, seed=0, batched_chunk=True)
            answer["batched_chunk_error"] = None
        except Exception as exc:  # onnxruntime's pybind errors share no useful base class
            answer["batched_chunk_error"] = str(exc)
    elif mode == "logits":
        np.save(paths[1], prefill_logits(loaded[0]))
    return answer


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:])))
