"""Running exported decoders in onnxruntime: the one session factory and device resolver, seeded feeds, and
graph-vs-graph comparisons (the fuse and quantize passes both check their output against their input graph).
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import onnxruntime as ort

from recipec.errors import PassError

# The exporter's optional input selecting how many trailing positions get logits (0 = all).
LOGITS_TO_KEEP = "logits_to_keep"
# Above this the protobuf cannot hold the weights (2 GiB limit); keep headroom for the graph itself.
EXTERNAL_DATA_BYTES = 1 << 30


DEVICES = ("auto", "cpu", "cuda")


def resolve_device(requested: str) -> str:
    """The one device resolver: "cpu" or "cuda" for a requested auto | cpu | cuda. auto takes CUDA where
    onnxruntime has its provider; cuda without it is an error, not a silent fall back to the CPU."""
    if requested not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {requested!r}")
    available = ort.get_available_providers()
    if requested != "cpu" and "CUDAExecutionProvider" in available:
        return "cuda"
    if requested == "cuda":
        raise PassError("device cuda was asked for, but onnxruntime has no CUDAExecutionProvider (it offers "
                        f"{', '.join(available)}); install onnxruntime-gpu (docs/gpu.md) or use device cpu")
    return "cpu"


def providers_for(device: str) -> list[str]:
    """Execution providers for a resolved device; on "cuda", the CPU takes the nodes CUDA has no kernel for."""
    if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def session(path: Path | bytes, device: str = "cpu", level: ort.GraphOptimizationLevel | None = None,
            optimized_path: Path | None = None, external: bool = False, threads: int | None = None,
            profile_prefix: Path | None = None, spin_us: int | None = None) -> ort.InferenceSession:
    """The one session factory, for a graph file or a serialized graph (bytes). With optimized_path, onnxruntime also writes its optimized graph there
    (offline mode); with profile_prefix, it records a trace that end_profiling() writes beside that prefix
    (recipec.onnx.placement reads it). spin_us: how long the intra-op pool's threads spin waiting for work
    after a run before they sleep (None: onnxruntime's default; 0: they stop when a run ends). A graph
    onnxruntime cannot load is a PassError naming the file."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the overridable logits_to_keep initializer draws a warning on every load
    if threads:
        options.intra_op_num_threads = threads
    if spin_us == 0:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    elif spin_us is not None:
        options.add_session_config_entry("session.intra_op.spin_duration_us", str(spin_us))
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_prefix)
    if level is not None:
        options.graph_optimization_level = level
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
        if external:
            options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                             optimized_path.name + ".data")
            options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                             "1024")
    source, shown = (path, "an in-memory graph") if isinstance(path, bytes) else (str(path), str(path))
    try:
        return ort.InferenceSession(source, options, providers=providers_for(device))
    except Exception as exc:  # onnxruntime's pybind exception types share no useful base class
        raise PassError(f"onnxruntime cannot load {shown}: {exc}") from None


def save_model(proto: onnx.ModelProto, out_dir: Path) -> Path:
    """model.onnx, with weights in model.onnx.data when they would not fit one protobuf."""
    path = out_dir / "model.onnx"
    for stale in (path, out_dir / "model.onnx.data"):
        stale.unlink(missing_ok=True)
    external = _initializer_bytes(proto) > EXTERNAL_DATA_BYTES or not _no_external(proto)
    onnx.save_model(proto, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    if external:
        share_data_file_mode(path)
    return path


def share_data_file_mode(model_path: Path) -> None:
    """onnx creates the external data file owner-only; give it model.onnx's permissions, so that a server
    running as another user (Triton in a container) can read both."""
    shutil.copymode(model_path, model_path.with_name("model.onnx.data"))


def _initializer_bytes(proto: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) or t.ByteSize() for t in proto.graph.initializer)


def _no_external(proto: onnx.ModelProto) -> bool:
    return not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)


def file_bytes(directory: Path) -> int:
    return sum((directory / n).stat().st_size for n in ("model.onnx", "model.onnx.data") if (directory / n).exists())


@dataclass(frozen=True)
class DecoderIO:
    """What a decoder graph expects, read off its inputs and outputs."""
    past: list[tuple[str, int, int]]  # (input name, kv heads, head size) per past_key_values.* input
    has_position_ids: bool
    vocab: int
    dtype: np.dtype

    @classmethod
    def of(cls, sess: ort.InferenceSession) -> "DecoderIO":
        inputs = {i.name: i for i in sess.get_inputs()}
        past = [(n, int(i.shape[1]), int(i.shape[3])) for n, i in inputs.items() if n.startswith("past_key_values.")]
        logits = next(o for o in sess.get_outputs() if o.name == "logits")
        first = inputs[past[0][0]] if past else None
        cache_types = {"tensor(float16)": np.float16, "tensor(int8)": np.int8}  # int8: quantize_kv's cache
        dtype = cache_types.get(first.type, np.float32) if first is not None else np.float32
        return cls(past, "position_ids" in inputs, int(logits.shape[-1]), np.dtype(dtype))

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
        batch, seq = input_ids.shape
        mask = np.ones((batch, seq), np.int64) if attention_mask is None else attention_mask
        empty = {name: np.zeros((batch, heads, 0, size), self.dtype) for name, heads, size in self.past}
        return {"input_ids": input_ids.astype(np.int64), "attention_mask": mask, **self._positions(mask, seq), **empty}

    def step(self, previous: dict[str, np.ndarray], presents: list[np.ndarray], next_ids: np.ndarray) -> dict[str, np.ndarray]:
        """The decode step after `previous`, fed the present.* outputs it produced."""
        batch, seq = next_ids.shape
        mask = np.concatenate([previous["attention_mask"], np.ones((batch, seq), np.int64)], axis=1)
        past = {name: present for (name, _, _), present in zip(self.past, presents)}
        return {"input_ids": next_ids.astype(np.int64), "attention_mask": mask, **self._positions(mask, seq), **past}

    def presents(self, outputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The present.* outputs of a run, in the order step() takes them."""
        return [outputs[_present(name)] for name, _, _ in self.past]

    def _positions(self, mask: np.ndarray, seq: int) -> dict[str, np.ndarray]:
        if not self.has_position_ids:
            return {}
        # transformers' generate(): cumulative count of real tokens, padded slots at 1
        positions = np.cumsum(mask, axis=1) - 1
        positions[mask == 0] = 1
        return {"position_ids": positions[:, -seq:].astype(np.int64)}


def run(sess: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    wanted = {i.name for i in sess.get_inputs()} | {i.name for i in sess.get_overridable_initializers()}
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, {k: v for k, v in feeds.items() if k in wanted})))


def seeded_cases(io: DecoderIO, seed: int, batch: int = 2, prompt: int = 8, pad: int = 3):
    """A left-padded batched prefill (row 0 unpadded) and the ids of the steps after it."""
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, prompt), np.int64)
    mask[-1, :pad] = 0
    prefill = io.prefill(rng.integers(0, io.vocab, (batch, prompt)), mask)
    return prefill, rng.integers(0, io.vocab, (batch, 1)), rng.integers(0, io.vocab, (batch, 3))


def max_logit_diffs(reference: ort.InferenceSession, candidate: ort.InferenceSession, seed: int,
                    pad: int = 3, batched_chunk: bool = True) -> dict[str, float]:
    """max |Δlogits| and |Δpresent| over real (unpadded) positions: a left-padded prefill, the same prefill
    with logits_to_keep=1, a decode step, then a 3-token step with a past (speculative / chunked prefill), of
    the whole batch or, for a graph that runs such steps at batch 1 only (GroupQueryAttention without
    query_seqlens: `batched_chunk` False), of its last row. A shared-buffer graph is checked unpadded (`pad` 0)."""
    io = DecoderIO.of(reference)
    prefill, decode_ids, chunk_ids = seeded_cases(io, seed, pad=pad)
    diffs, ref = _compare_step(reference, candidate, prefill, "prefill")
    diffs.update(_last_logits(reference, candidate, prefill))
    decode = io.step(prefill, [ref[_present(n)] for n, _, _ in io.past], decode_ids)
    more, ref = _compare_step(reference, candidate, decode, "decode")
    chunk = io.step(decode, [ref[_present(n)] for n, _, _ in io.past], chunk_ids)
    if not batched_chunk:  # a graph that takes several new tokens after a past at batch 1 only
        chunk = {name: value[-1:] for name, value in chunk.items()}
    return {**diffs, **more, **_compare_step(reference, candidate, chunk, "chunk")[0]}


def _compare_step(reference, candidate, feeds: dict[str, np.ndarray], case: str) -> tuple[dict[str, float], dict]:
    ref, new = run(reference, feeds), run(candidate, feeds)
    mask = feeds["attention_mask"].astype(bool)
    diffs = {f"{case}_logits": _masked_max(ref["logits"], new["logits"], mask[:, -feeds["input_ids"].shape[1]:]),
             f"{case}_present": _present_max(ref, new, mask)}
    return diffs, ref


def _last_logits(reference, candidate, prefill: dict[str, np.ndarray]) -> dict[str, float]:
    """logits_to_keep=1 must still select the last position (onnxscript's folding once broke it)."""
    if LOGITS_TO_KEEP not in {i.name for i in reference.get_overridable_initializers()}:
        return {}
    last = {**prefill, LOGITS_TO_KEEP: np.array(1, np.int64)}
    ref, new = run(reference, last)["logits"], run(candidate, last)["logits"]
    if new.shape != ref.shape:
        return {"prefill_last_logits": float("inf")}
    return {"prefill_last_logits": _masked_max(ref, new, np.ones(ref.shape[:2], bool))}


def _present(past_name: str) -> str:
    return "present." + past_name[len("past_key_values."):]


def _masked_max(a: np.ndarray, b: np.ndarray, real: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32))[real].max())


def _present_max(ref: dict, new: dict, real: np.ndarray) -> float:
    """Cache rows of padded slots are never attended to, so they may hold anything."""
    names = [k for k in ref if k.startswith("present.")]
    if not names:
        return 0.0
    return max(float(np.abs(ref[n].astype(np.float32) - new[n].astype(np.float32)).transpose(0, 2, 1, 3)[real].max())
               for n in names)


def windows(tokens, batch: int) -> Iterator[np.ndarray]:
    array = np.asarray(tokens.cpu().numpy() if hasattr(tokens, "cpu") else tokens, dtype=np.int64)
    for start in range(0, len(array), batch):
        yield array[start:start + batch]


def logits_to_keep_works(sess: ort.InferenceSession) -> bool:
    """True when the graph has no logits_to_keep input, or honours logits_to_keep=1."""
    if LOGITS_TO_KEEP not in {i.name for i in sess.get_overridable_initializers()}:
        return True
    feeds = {**DecoderIO.of(sess).prefill(np.zeros((1, 3), np.int64)), LOGITS_TO_KEEP: np.array(1, np.int64)}
    return run(sess, feeds)["logits"].shape[1] == 1
