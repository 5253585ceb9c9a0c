"""Run by tests/peer_envs.run_probe inside another environment; prints one JSON line.

    python tests/ort_probe.py load GRAPH                  -> {"onnxruntime", "error": null or onnxruntime's message}
    python tests/ort_probe.py compare REFERENCE CANDIDATE -> {"onnxruntime", "error", "diffs", "batched_chunk_error"}
    python tests/ort_probe.py logits GRAPH OUT.npy        -> {"onnxruntime", "error"}; OUT.npy: prefill logits
The graphs are compared with recipec.onnx.sessions' own check (the one fuse runs), in this onnxruntime.
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


def main(mode: str, *paths: str) -> dict:
    answer = {"onnxruntime": onnxruntime.__version__, "error": None}
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
