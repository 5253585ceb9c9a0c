"""export's verification: the graph in onnxruntime against the PyTorch model on seeded inputs (a left-padded
prefill, the same asking for its last position only, a decode step), failing on any logit past tolerance.

In two steps, so that the model and the session never hold their copies of the weights at once: PyTorch's
logits are computed first (`torch_reference`, small arrays), the caller frees the model, then onnxruntime
runs the graph against them (`check_against`)."""
from __future__ import annotations

import gc
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from recipec.onnx import artifact as art
from recipec.onnx.sessions import session as make_session
from recipec.passes.base import PassError
from recipec.passes.onnx.trace import load_torch_model, output_cache

VERIFY_BATCH, VERIFY_SEQ, VERIFY_PADDING = 2, 7, 3
_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def verify_variant(variant_dir: Path | str, model_dir: Path | str, *, atol: float = 1e-3, rtol: float = 1e-3,
                   seed: int = 0) -> dict[str, Any]:
    """Check an existing variant's graph against the PyTorch model in model_dir (raises PassError on mismatch)."""
    reference = torch_reference(load_torch_model(model_dir), variant_dir, seed=seed)
    gc.collect()  # the model is gone before onnxruntime loads its copy of the weights
    return check_against(variant_dir, reference, atol=atol, rtol=rtol)


@dataclass
class Reference:
    """What PyTorch computed on the verification's inputs; all the check needs once the model is freed."""

    seed: int
    prefill: dict[str, np.ndarray]
    decode: dict[str, np.ndarray]
    prefill_logits: np.ndarray
    decode_logits: np.ndarray


def torch_reference(model: torch.nn.Module, variant_dir: Path | str, *, seed: int) -> Reference:
    """The model's logits on seeded inputs: a batch-2 prefill whose second row is left-padded, then one
    decode step on its cache. The graph's inputs (read without its weights) decide whether position ids
    are fed, so both sides get the same feed."""
    model.eval()
    if getattr(model.config, "_experts_implementation", None) == "batched_mm":
        # The export traces batched_mm, which copies each routed expert's weights per token (1.3 GB for
        # 14 tokens of Qwen1.5-MoE); the per-expert loop computes the same without, and independently.
        model.set_experts_implementation("eager")
    graph_inputs = {v.name for v in onnx.load(str(_model_file(variant_dir)), load_external_data=False).graph.input}
    vocab = model.config.get_text_config().vocab_size
    prefill = _prefill_case(vocab, seed, "position_ids" in graph_inputs)
    prefill_logits, cache = _torch_step(model, prefill, None)
    decode = _decode_case(prefill, seed, vocab)
    decode_logits, _ = _torch_step(model, decode, cache)
    return Reference(seed, prefill, decode, prefill_logits, decode_logits)


def check_against(variant_dir: Path | str, ref: Reference, *, atol: float, rtol: float) -> dict[str, Any]:
    """Run the graph on the reference's inputs and compare logits in three cases: every unpadded position of
    the prefill, the same prefill asking for its last position only (when the graph can), and the decode
    step, each side continuing from its own cache as a runtime would."""
    import onnxruntime

    session = make_session(_model_file(variant_dir))
    results: dict[str, float] = {}
    outs = _ort_step(session, ref.prefill, None, "prefill")
    valid = ref.prefill["attention_mask"].astype(bool)
    results["prefill"] = _compare(outs[0][valid], ref.prefill_logits[valid], atol, rtol,
                                  "prefill (batch 2, left-padded)")
    if art.LOGITS_TO_KEEP in {i.name for i in session.get_overridable_initializers()}:
        last = _ort_step(session, {**ref.prefill, art.LOGITS_TO_KEEP: np.array(1, dtype=np.int64)}, None, "prefill")
        results["prefill_last"] = _compare(last[0][:, -1], ref.prefill_logits[:, -1], atol, rtol,
                                           "prefill with logits_to_keep=1")
    outs = _ort_step(session, ref.decode, outs[1:], "decode")
    results["decode"] = _compare(outs[0], ref.decode_logits, atol, rtol, "a decode step after the padded prefill")
    return {"onnxruntime": onnxruntime.__version__, "atol": atol, "rtol": rtol, "seed": ref.seed,
            **{f"{case}_max_abs_diff": diff for case, diff in results.items()},
            "max_abs_diff": max(results.values())}


def _model_file(variant_dir: Path | str) -> Path:
    path = Path(variant_dir) / art.MODEL_FILE
    if not path.is_file():
        raise PassError(f"{path.parent} has no {path.name}")
    return path


def _prefill_case(vocab: int, seed: int, position_ids: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (VERIFY_BATCH, VERIFY_SEQ), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, :VERIFY_PADDING] = 0
    feed = {"input_ids": ids, "attention_mask": mask}
    if position_ids:
        feed["position_ids"] = np.maximum(mask.cumsum(-1) - 1, 0)
    return feed


def _decode_case(prefill: dict[str, np.ndarray], seed: int, vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed + 1)
    mask = np.concatenate([prefill["attention_mask"], np.ones((VERIFY_BATCH, 1), np.int64)], axis=1)
    feed = {"input_ids": rng.integers(0, vocab, (VERIFY_BATCH, 1), dtype=np.int64), "attention_mask": mask}
    if "position_ids" in prefill:
        feed["position_ids"] = mask.sum(-1, keepdims=True) - 1
    return feed


def _torch_step(model, feed: dict[str, np.ndarray], cache) -> tuple[np.ndarray, Any]:
    kwargs = {name: torch.from_numpy(value) for name, value in feed.items() if name != art.LOGITS_TO_KEEP}
    if cache is not None:
        kwargs["cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"] = cache
    with torch.no_grad():
        out = model(**kwargs, use_cache=True)
    return out.logits.float().numpy(), output_cache(out)


def _ort_step(session, feed: dict[str, np.ndarray], past: list[np.ndarray] | None, case: str) -> list[np.ndarray]:
    """logits, then the presents in the order of the past inputs they continue."""
    inputs = {i.name: i for i in session.get_inputs()}
    past_names = [name for name in inputs if name.startswith("past_key_values.")]
    if past is None:
        batch = feed["input_ids"].shape[0]
        past = [np.zeros([batch, inputs[n].shape[1], 0, inputs[n].shape[3]], _NUMPY_TYPES[inputs[n].type])
                for n in past_names]
    outputs = ["logits"] + [name.replace("past_key_values.", "present.", 1) for name in past_names]
    try:
        return session.run(outputs, {**feed, **dict(zip(past_names, past, strict=True))})
    except Exception as exc:  # onnxruntime's pybind exception types share no useful base class
        raise PassError(f"export verification failed: onnxruntime could not run the graph at {case}: {exc}") from None


def _compare(got: np.ndarray, ref: np.ndarray, atol: float, rtol: float, case: str) -> float:
    if got.shape != ref.shape:
        raise PassError(f"export verification failed at {case}: the graph's logits have shape {got.shape}, "
                        f"PyTorch's {ref.shape}: the variant was not exported from this model")
    diff = np.abs(got.astype(np.float64) - ref)
    worst = float(diff.max()) if np.isfinite(diff).all() else float("inf")
    if not np.all(diff <= atol + rtol * np.abs(ref)):
        raise PassError(
            f"export verification failed at {case}: max |Δlogits| = {worst:.3g} between onnxruntime and PyTorch "
            f"exceeds the tolerance verify_atol {atol:g} + verify_rtol {rtol:g} x |logit|. The ONNX graph does not "
            "compute what the model computes (see docs/export.md); raise the tolerances only if the difference "
            "is rounding noise")
    return worst
