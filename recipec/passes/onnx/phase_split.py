"""phase_split: one variant that runs one graph for prefill and another for decode over the same KV cache.

Prefill multiplies many tokens per weight read and is compute-bound, decode reads every weight for one token
and is bandwidth-bound, so each phase has its own best graph (int8 prefill where int8 GEMMs are fast, int4
decode where a step reads the fewest bytes). The stage's input (the first id in `after`) is the decode
graph; `with: {prefill: <stage>}` names the prefill graph's stage, an ONNX stage that runs before this one.

The output is the decode variant's directory with the prefill graph beside it as prefill.onnx (its external
data renamed to match) and artifact.json's `phases` section; recipec.runtime.lm.load runs prefill and
multi-token forwards on prefill.onnx and decode steps on model.onnx. The two graphs must agree on every
input and output (names, dtypes, shapes: the KV layout and the logits), since the cache one writes is the
cache the other reads; a difference fails the stage and names it.

Quality is scored on the combination, teacher-forced on the eval windows: the first `prompt_tokens` of each
window prefill, the rest are decode steps. The decode-step distributions are compared (KL with each single
graph as P, top-1 agreement) with the decode graph alone and the prefill graph alone on the same windows.
docs/phase-split.md has the recipe form and what Triton and onnxruntime-genai do with such a variant.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from recipec.core.params import NO_DEFAULT, prop
from recipec.onnx import artifact as art
from recipec.onnx.logits import log_softmax
from recipec.passes.base import CheckContext, Pass, PassError, StageContext
from recipec.runtime.lm import OnnxLM, load

PREFILL_DATA = "prefill.onnx.data"
# Windows scored per batch: bounds the logits held at once (batch x steps x vocab float32).
SCORE_BATCH = 8

PARAMS: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "required": ["prefill"],
    "properties": {
        "prefill": prop("string", NO_DEFAULT, "Id of the ONNX stage whose graph runs prefill (and every multi-token "
                                        "forward); it must run before this one: list it in `after` "
                                        "(after: [<decode stage>, <prefill stage>]). The stage's input, the "
                                        "first id in `after`, is the decode graph.", minLength=1),
        "prompt_tokens": prop(["integer", "null"], None, "Tokens of each eval window that go through the "
                                                         "prefill graph when scoring; the rest are decode steps. "
                                                         "null = half the window.", minimum=1),
        "max_kl": prop("number", 0.1, "Largest mean KL, over the decode steps, of the combination's next-token "
                                      "distributions from either graph's alone (each alone as P).", minimum=0),
    },
}


def check(params: dict[str, Any], ctx: CheckContext) -> list[tuple[tuple, str]]:
    prefill = params["prefill"]
    if prefill == ctx.stage_id:
        return [(("prefill",), f"{prefill!r} cannot be its own prefill graph")]
    if prefill not in ctx.upstream:
        earlier = sorted(s for s, kind in ctx.produces.items() if kind == "onnx")
        return [(("prefill",), (f"prefill {prefill!r} is not a stage that runs before {ctx.stage_id!r}; name one "
                                f"of {', '.join(earlier) or '(no ONNX stage)'}, or list {prefill!r} in `after` "
                                f"(after: [<decode stage>, {prefill}])"))]
    if ctx.produces[prefill] != "onnx":
        return [(("prefill",), (f"prefill {prefill!r} is a PyTorch stage ({ctx.upstream[prefill]}); the prefill "
                                "graph must be an ONNX stage (an export, fuse or quantize)"))]
    return []


def layout_differences(prefill: dict[str, Any], decode: dict[str, Any]) -> list[str]:
    """Where two artifacts' graphs disagree on what they take and return (inputs, outputs, KV cache,
    vocabulary); empty when one graph's cache and logits can stand in for the other's."""
    differences = []
    for section in ("inputs", "outputs"):
        ours = {t["name"]: t for t in prefill["graph"][section]}
        theirs = {t["name"]: t for t in decode["graph"][section]}
        for name in sorted(ours.keys() | theirs.keys()):
            a, b = ours.get(name), theirs.get(name)
            if a is None or b is None:
                differences.append(f"{section[:-1]} {name} only in the {'prefill' if b is None else 'decode'} graph")
            elif (a["dtype"], a["shape"]) != (b["dtype"], b["shape"]):
                differences.append(f"{section[:-1]} {name}: prefill {a['dtype']} {a['shape']}, "
                                   f"decode {b['dtype']} {b['shape']}")
    if prefill["kv_cache"] != decode["kv_cache"] and not differences:
        differences.append(f"KV cache: prefill {prefill['kv_cache']}, decode {decode['kv_cache']}")
    if prefill["model"].get("vocab_size") != decode["model"].get("vocab_size"):
        differences.append(f"vocab_size: prefill {prefill['model'].get('vocab_size')}, "
                           f"decode {decode['model'].get('vocab_size')}")
    return differences


def _inputs(ctx: StageContext) -> tuple[Path, Path, dict[str, Any]]:
    """The decode and prefill variant directories, and the decode variant's artifact; refuses pairs that
    cannot share a cache."""
    decode_dir, prefill_dir = ctx.input_dir, ctx.stage_dir(ctx.params["prefill"])
    if decode_dir.resolve() == prefill_dir.resolve():
        raise PassError("phase_split: the prefill stage is the stage's own input; name another ONNX stage")
    decode, prefill = art.read_artifact(decode_dir), art.read_artifact(prefill_dir)
    for name, artifact in (("decode", decode), ("prefill", prefill)):
        if artifact.get("phases"):
            raise PassError(f"phase_split: the {name} variant is phase-split already; pair single-graph variants")
        if not artifact.get("kv_cache"):
            raise PassError(f"phase_split: the {name} graph has no KV cache to share")
    differences = layout_differences(prefill, decode)
    if differences:
        raise PassError(f"phase_split: the prefill graph ({ctx.params['prefill']}) and the decode graph do not "
                        f"share one KV layout and vocabulary: " + "; ".join(differences))
    return decode_dir, prefill_dir, decode


def copy_graph(source: Path, target: Path) -> list[str]:
    """Copy a graph under another name with its external data files renamed to match (the locations inside
    the graph rewritten, so the copy loads beside the original's other files); returns the data files."""
    proto = onnx.load(str(source), load_external_data=False)
    renamed: dict[str, str] = {}
    for tensor in proto.graph.initializer:
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        for entry in tensor.external_data:
            if entry.key == "location":
                old = entry.value
                entry.value = PREFILL_DATA if old == art.DATA_FILE else f"{target.stem}-{Path(old).name}"
                renamed[old] = entry.value
    for old, new in renamed.items():
        shutil.copy2(source.parent / old, target.parent / new)
    onnx.save(proto, str(target))
    return sorted(renamed.values())


def _windows(ctx: StageContext) -> tuple[np.ndarray, int]:
    tokens = ctx.data.eval()
    if tokens is None or len(tokens) == 0:
        raise PassError("phase_split: scoring the combination needs eval windows (the recipe's data.eval)")
    tokens = np.asarray(tokens, dtype=np.int64)
    prompt = ctx.params["prompt_tokens"] or tokens.shape[1] // 2
    if not 1 <= prompt <= tokens.shape[1] - 2:
        raise PassError(f"phase_split: prompt_tokens {prompt} leaves no decode step to score in eval windows of "
                        f"{tokens.shape[1]} tokens; use 1 to {tokens.shape[1] - 2}")
    return tokens, prompt


def step_logits(lm: OnnxLM, windows: np.ndarray, prompt: int) -> np.ndarray:
    """Teacher-forced next-token logits [B, steps, V] of the decode steps: prefill the first `prompt`
    tokens of each window, then feed the rest one token per decode step."""
    _, cache = lm.prefill(windows[:, :prompt].tolist())
    steps = []
    for t in range(prompt, windows.shape[1] - 1):
        logits, cache = lm.decode(windows[:, t], cache)
        steps.append(logits)
    return np.stack(steps, axis=1)


def _agreement(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Summed KL(reference || candidate) and top-1 agreements over the rows of [B, steps, V]."""
    lp, lq = log_softmax(reference), log_softmax(candidate)
    kl = float((np.exp(lp) * (lp - lq)).sum())
    return np.array([kl, float((reference.argmax(-1) == candidate.argmax(-1)).sum())])


def score(combined: OnnxLM, tokens: np.ndarray, prompt: int) -> dict[str, Any]:
    """The combination's decode steps against the decode graph alone and the prefill graph alone, and the
    two graphs against each other, for scale."""
    alone = {"decode": OnnxLM(combined.session, combined.artifact, combined.device),
             "prefill": OnnxLM(combined.prefill_session, combined.artifact, combined.device)}
    sums = {key: np.zeros(2) for key in ("decode_alone", "prefill_alone", "prefill_vs_decode")}
    for start in range(0, len(tokens), SCORE_BATCH):
        windows = tokens[start:start + SCORE_BATCH]
        ours = step_logits(combined, windows, prompt)
        theirs = {name: step_logits(lm, windows, prompt) for name, lm in alone.items()}
        sums["decode_alone"] += _agreement(theirs["decode"], ours)
        sums["prefill_alone"] += _agreement(theirs["prefill"], ours)
        sums["prefill_vs_decode"] += _agreement(theirs["prefill"], theirs["decode"])
    positions = len(tokens) * (tokens.shape[1] - 1 - prompt)
    scores: dict[str, Any] = {key: {"kl_mean": float(kl / positions), "top1_agreement": float(top1 / positions)}
                              for key, (kl, top1) in sums.items()}
    return {**scores, "positions": positions, "prompt_tokens": prompt}


def _check_quality(scores: dict[str, Any], max_kl: float) -> None:
    for name in ("decode_alone", "prefill_alone"):
        kl = scores[name]["kl_mean"]
        if kl > max_kl:
            raise PassError(f"phase_split: the combination's decode steps drift from the {name.replace('_', ' ')}: "
                            f"mean KL {kl:.4g} (max_kl {max_kl:g}); the two graphs' caches are too different "
                            "to share (pair closer variants) or relax max_kl")


def apply(ctx: StageContext) -> dict[str, Any]:
    decode_dir, prefill_dir, base = _inputs(ctx)
    tokens, prompt = _windows(ctx)
    shutil.copytree(decode_dir, ctx.output_dir, dirs_exist_ok=True)
    data_files = copy_graph(prefill_dir / art.MODEL_FILE, ctx.output_dir / art.PREFILL_FILE)
    written = art.write_artifact_json(ctx.output_dir, base=base,
                                      phases={"prefill": art.PREFILL_FILE, "decode": art.MODEL_FILE})
    with ctx.progress("scoring prefill + decode against each graph alone", total=None):
        combined = load(ctx.output_dir, device=ctx.device)
        scores = score(combined, tokens, prompt)
        del combined
    _check_quality(scores, ctx.params["max_kl"])
    ctx.log(f"phase_split: prefill {ctx.params['prefill']}, decode input; decode-step KL to the decode graph "
            f"alone {scores['decode_alone']['kl_mean']:.4g}, to the prefill graph alone "
            f"{scores['prefill_alone']['kl_mean']:.4g}")
    prefill = written["phases"]["prefill"]
    return {"prefill_stage": ctx.params["prefill"], "phases": {"prefill": art.PREFILL_FILE, "decode": art.MODEL_FILE},
            "prefill_data_files": data_files, "max_kl": ctx.params["max_kl"], **scores,
            "bytes_per_decode_step": {"decode": written["weights"]["bytes_per_decode_step"],
                                      "prefill": prefill["weights"]["bytes_per_decode_step"]},
            "compute_dtype": {"decode": written["compute_dtype"], "prefill": prefill["compute_dtype"]},
            "file_bytes": sum(f["bytes"] for f in written["files"])}


PASS = Pass(
    op="phase_split",
    consumes="onnx",
    produces="onnx",
    params=PARAMS,
    apply=apply,
    summary="Pair two ONNX variants over one KV layout: the input's graph decodes, the `prefill` stage's graph "
            "prefills; checks the layouts agree and scores the combination against each graph alone.",
    uses_data=("eval",),
    check=check,
)
