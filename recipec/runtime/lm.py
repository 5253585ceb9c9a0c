"""Run an ONNX variant: a step API for serving engines and `generate` on top of it.

    lm = load("out/x/variants/int4", device="auto", threads=None)
    logits, cache = lm.prefill([[5, 6, 7], [8, 9]])   # last-position logits [B, V] (numpy), KVCache
    logits, cache = lm.decode([11, 12], cache)         # one token per row -> [B, V], the grown cache
    cache = cache.select([1])                          # keep row 1 (drop finished sequences)
    cache = cache.merge(other_cache)                   # rows of both; the shorter cache is left-padded
    cache = cache.truncate(cache.seq_len - 2)          # drop the last two columns (speculative rollback)
    result = lm.generate([[5, 6, 7]], max_new_tokens=16, temperature=0.0)

Prefill left-pads the prompts and computes position_ids from the attention mask (count of real tokens
before each position), so a padded row computes exactly what it would alone. It feeds logits_to_keep=1
where the graph has that optional input, so the vocabulary projection runs for the last position only;
a graph without it returns every position and the runtime keeps the last one.

KVCache holds per-layer key/value arrays [batch, kv_heads, seq_len, head_dim] and the attention mask
[batch, seq_len] (1 = real token, 0 = padding). Rows are independent: `select` and `merge` only move rows
and padding columns, and position ids follow from the mask, so requests can join and leave a running
decode batch (continuous batching).

Every step runs through IOBinding: the past is bound as OrtValues where it lives and the presents are
allocated on the cache's device, so on CUDA (onnxruntime-gpu) the cache stays on the GPU between steps and
only the logits come back to the host. The CPU path is the same code with device "cpu" (as fast as
`InferenceSession.run` here), which is how the CUDA path gets tested without a GPU. `select` and `merge`
stay on the device too: they are small onnxruntime graphs on the same provider (`kv_ops.py`), so a
request joining or leaving moves the cache within the GPU, never through the host; only the mask, a
host array, is cut and padded in numpy.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from recipec.core.files import TOKENIZER_MODEL_FILES
from recipec.onnx import artifact as art
from recipec.onnx.sessions import resolve_device, session
from recipec.errors import PassError
from recipec.runtime.kv_ops import KVOps

_NUMPY_TYPES = {"float32": np.float32, "float16": np.float16, "int8": np.int8}
# A phase-split variant's two sessions take turns, each with its own thread pool. The prefill pool stops
# spinning when its run ends: a pool spinning on after it would take the cores from the decode steps. The decode
# pool spins this long, enough to bridge the host work between two steps (tens of microseconds), too short to
# slow a prefill that follows the last step much: always stopping made every step wake its threads, and TPOT
# ~6% slower than the decode graph alone at 5M parameters; spinning at onnxruntime's default doubled TTFT at
# 156M (docs/benchmarks.md, "Phase-split sessions").
SPLIT_DECODE_SPIN_US = 100


@dataclass
class KVCache:
    keys: list[Any]  # per layer [B, H, T, D]: an onnxruntime OrtValue on the session's device, or np.ndarray
    values: list[Any]
    mask: np.ndarray  # int64 [B, T]: 1 where the cache holds a real token
    # The model's moves, on its device; a cache built by hand (numpy) gets CPU ones.
    ops: KVOps | None = field(default=None, repr=False, compare=False)

    @property
    def batch_size(self) -> int:
        return int(self.mask.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.mask.shape[1])

    def positions(self) -> np.ndarray:
        """Position id of each row's next token: the number of real tokens it holds."""
        return self.mask.sum(axis=1)

    def select(self, rows: Sequence[int]) -> "KVCache":
        """The given rows, in that order, without the leading columns that are padding in all of them."""
        rows = np.asarray(rows, dtype=np.int64)
        mask = self.mask[rows]
        start = _first_used_column(mask)
        return self._with(self._ops().select(self._tensors(), rows, start), mask[:, start:])

    def merge(self, other: "KVCache") -> "KVCache":
        """This cache's rows followed by other's; the shorter one is left-padded to the longer length."""
        length = max(self.seq_len, other.seq_len)
        pad, other_pad = length - self.seq_len, length - other.seq_len
        tensors = self._ops().merge(self._tensors(), other._tensors(), pad, other_pad)
        mask = np.concatenate([np.pad(self.mask, ((0, 0), (pad, 0))), np.pad(other.mask, ((0, 0), (other_pad, 0)))])
        return self._with(tensors, mask)

    def truncate(self, length: int) -> "KVCache":
        """The first `length` columns: what the cache held before its last seq_len - length tokens."""
        if not 0 <= length <= self.seq_len:
            raise ValueError(f"cannot truncate a cache of {self.seq_len} columns to {length}")
        if length == self.seq_len:
            return self
        return self._with(self._ops().truncate(self._tensors(), length), self.mask[:, :length])

    def host(self) -> "KVCache":
        """The same cache with numpy arrays (a copy from the device where it lives on one)."""
        return KVCache([_host(k) for k in self.keys], [_host(v) for v in self.values], self.mask, self.ops)

    def _tensors(self) -> list[Any]:
        return [*self.keys, *self.values]

    def _with(self, tensors: list[Any], mask: np.ndarray) -> "KVCache":
        layers = len(self.keys)
        return KVCache(tensors[:layers], tensors[layers:], mask, self.ops)

    def _ops(self) -> KVOps:
        return self.ops if self.ops is not None else _cpu_ops()


def _first_used_column(mask: np.ndarray) -> int:
    used = mask.any(axis=0)
    return int(used.argmax()) if used.any() else mask.shape[1]


def _host(tensor: Any) -> np.ndarray:
    return tensor if isinstance(tensor, np.ndarray) else tensor.numpy()


@functools.cache
def _cpu_ops() -> KVOps:
    return KVOps("cpu")


@dataclass(frozen=True)
class _GraphInfo:
    """What a session's graph takes beyond the fixed inputs: position_ids, and logits_to_keep."""

    position_ids: bool
    select_logits: bool

    @classmethod
    def of(cls, sess: Any) -> "_GraphInfo":
        return cls("position_ids" in {i.name for i in sess.get_inputs()},
                   art.LOGITS_TO_KEEP in {i.name for i in sess.get_overridable_initializers()})


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated tokens per prompt (eos included when it stopped a sequence)
    token_times: list[list[float]]  # time.perf_counter() when each token was available
    start_time: float  # time.perf_counter() before prefill
    finish_reasons: list[str] = field(default_factory=list)  # "eos" or "length" per prompt

    def ttft(self, i: int) -> float | None:
        return self.token_times[i][0] - self.start_time if self.token_times[i] else None

    def tpot(self, i: int) -> float | None:
        """Mean time per output token after the first (None below two tokens), as vLLM defines it."""
        times = self.token_times[i]
        return (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None


class OnnxLM:
    def __init__(self, session: Any, artifact: dict[str, Any], device: str, prefill_session: Any = None):
        """prefill_session: a phase-split variant's prefill graph (docs/phase-split.md), which prefill and
        every multi-token forward run while decode steps run `session`; both share one KV layout, which the
        phase_split pass checked, so the cache one writes is the cache the other reads."""
        self.session, self.artifact, self.device = session, artifact, device
        self.prefill_session = prefill_session if prefill_session is not None else session
        self.session_seconds: float | None = None  # the last onnxruntime run's wall time
        kv = artifact.get("kv_cache")
        if not kv:
            raise PassError("the variant's graph has no past_key_values inputs; the runtime needs a graph "
                                 "with a KV cache")
        self.num_layers, self.kv_heads, self.head_dim = kv["num_layers"], kv["num_kv_heads"], kv["head_dim"]
        self.kv_dtype = _NUMPY_TYPES.get(kv["dtype"], np.float32)
        logits = next(o for o in artifact["graph"]["outputs"] if o["name"] == "logits")
        self.vocab_size, self.logits_dtype = logits["shape"][-1], _NUMPY_TYPES.get(logits["dtype"], np.float32)
        self._past = art.kv_names(kv["inputs"], self.num_layers)
        # Outputs are fetched by name in this order (logits, then key/value per layer), whatever the graph's order.
        self._outputs = ["logits", *art.kv_names(kv["outputs"], self.num_layers)]
        self._info = {"decode": _GraphInfo.of(self.session), "prefill": _GraphInfo.of(self.prefill_session)}
        self._kv_ops = KVOps(device)
        self._kv_ops.prepare(self.kv_dtype, 2 * self.num_layers)
        eos = artifact["model"].get("eos_token_id")
        self.eos_token_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        pad = artifact["model"].get("pad_token_id")
        self.pad_token_id = pad if pad is not None else 0

    @property
    def shared_buffer(self) -> bool:
        return self.artifact["kv_cache"].get("buffer") == "shared"

    @property
    def phase_split(self) -> bool:
        return self.prefill_session is not self.session

    # --- step API -------------------------------------------------------------------------------------

    def empty_cache(self, batch_size: int) -> KVCache:
        shape = (batch_size, self.kv_heads, 0, self.head_dim)
        return KVCache([np.zeros(shape, self.kv_dtype) for _ in range(self.num_layers)],
                       [np.zeros(shape, self.kv_dtype) for _ in range(self.num_layers)],
                       np.zeros((batch_size, 0), np.int64), self._kv_ops)

    def prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, KVCache]:
        """Run left-padded prompts; returns the logits of each prompt's last token [B, V] and the cache."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("prefill needs at least one prompt and no empty prompt")
        width = max(len(p) for p in prompts)
        ids = np.full((len(prompts), width), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(prompts), width), dtype=np.int64)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = prompt
            mask[row, width - len(prompt):] = 1
        logits, cache = self.forward(ids, mask, self.empty_cache(len(prompts)), logits_to_keep=1, phase="prefill")
        return logits[:, -1], cache

    def decode(self, tokens: Sequence[int] | np.ndarray, cache: KVCache) -> tuple[np.ndarray, KVCache]:
        """One new token per row of the cache; returns logits [B, V] and the grown cache."""
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1, 1)
        if ids.shape[0] != cache.batch_size:
            raise ValueError(f"decode got {ids.shape[0]} tokens for a cache of {cache.batch_size} rows")
        logits, cache = self.forward(ids, np.ones_like(ids), cache, logits_to_keep=1, phase="decode")
        return logits[:, -1], cache

    def forward(self, input_ids: np.ndarray, new_mask: np.ndarray, cache: KVCache,
                logits_to_keep: int = 0, phase: str | None = None) -> tuple[np.ndarray, KVCache]:
        """New tokens [B, S] (new_mask 0 marks left padding) after the cache; logits of the last
        logits_to_keep positions (0 = all) [B, S', V] and the cache grown by S. phase ("prefill" or
        "decode") picks a phase-split variant's graph; None picks by width: the prefill graph for S > 1,
        since many tokens at once is the prefill's shape (speculative verification, quality evaluation)."""
        if phase is None:
            phase = "prefill" if input_ids.shape[1] > 1 else "decode"
        if phase not in self._info:
            raise ValueError(f"phase must be prefill or decode, got {phase!r}")
        sess, info = self.prefill_session if phase == "prefill" else self.session, self._info[phase]
        mask = np.concatenate([cache.mask, new_mask.astype(np.int64)], axis=1)
        if self.shared_buffer and not mask.all():
            raise ValueError("this graph reads padding as right-padding (fuse kv_buffer: shared): batch prompts of "
                             "different lengths through recipec.runtime.slots.SlotLM, not a left-padded cache")
        feeds = {"input_ids": input_ids, "attention_mask": mask}
        if info.position_ids:
            feeds["position_ids"] = np.maximum(mask.cumsum(axis=1) - 1, 0)[:, -input_ids.shape[1]:]
        if info.select_logits:
            feeds[art.LOGITS_TO_KEEP] = np.array(logits_to_keep, dtype=np.int64)
        past = [t for pair in zip(cache.keys, cache.values, strict=True) for t in pair]
        outputs = self._run(sess, feeds, past)
        logits = outputs[0] if info.select_logits or logits_to_keep == 0 else outputs[0][:, -logits_to_keep:]
        return _host(logits), KVCache(list(outputs[1::2]), list(outputs[2::2]), mask, self._kv_ops)

    def _run(self, sess: Any, feeds: dict[str, np.ndarray], past: list[Any]) -> list[Any]:
        """One session run through IOBinding: past OrtValues are bound where they live, presents are
        allocated on the cache's device (the GPU under CUDA) and only the logits come to the host."""
        import onnxruntime

        binding = sess.io_binding()
        # bind_cpu_input cannot bind an overridable initializer (logits_to_keep); OrtValues can.
        for name, value in feeds.items():
            value = onnxruntime.OrtValue.ortvalue_from_numpy(np.require(value, requirements="C"))
            binding.bind_ortvalue_input(name, value)
        for name, value in zip(self._past, past, strict=True):
            if isinstance(value, np.ndarray):
                value = onnxruntime.OrtValue.ortvalue_from_numpy(np.require(value, requirements="C"), self.device)
            binding.bind_ortvalue_input(name, value)
        for name in self._outputs:
            binding.bind_output(name, "cpu" if name == "logits" else self.device)
        started = time.perf_counter()
        sess.run_with_iobinding(binding)
        self.session_seconds = time.perf_counter() - started  # the engine's overhead is its step minus this
        outputs = binding.get_outputs()  # in binding order, i.e. self._outputs
        return [outputs[0].numpy(), *outputs[1:]]

    # --- generation -----------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 eos_token_id: int | Sequence[int] | None = None, ignore_eos: bool = False,
                 on_token: Callable[[int, int, float], None] | None = None) -> GenerationResult:
        """Greedy (temperature 0) or sampled continuation of each prompt; a sequence stops at an eos token
        (the artifact's unless given, ignored with ignore_eos) or after max_new_tokens, and leaves the batch."""
        _check_sampling(temperature, top_k, top_p)
        stop = set(self.eos_token_ids if eos_token_id is None else np.atleast_1d(eos_token_id).tolist())
        stop = set() if ignore_eos else stop
        rng = np.random.default_rng(seed)
        result = GenerationResult([[] for _ in prompts], [[] for _ in prompts], time.perf_counter(),
                                  ["length"] * len(prompts))
        if max_new_tokens <= 0:
            return result
        logits, cache = self.prefill(prompts)
        rows = list(range(len(prompts)))  # rows[r] = prompt index of cache row r
        while True:
            tokens = sample(logits, temperature, top_k, top_p, rng)
            now = time.perf_counter()
            keep = []
            for r, token in enumerate(tokens.tolist()):
                seq = rows[r]
                result.tokens[seq].append(token)
                result.token_times[seq].append(now)
                if on_token is not None:
                    on_token(seq, token, now)
                if token in stop:
                    result.finish_reasons[seq] = "eos"
                elif len(result.tokens[seq]) < max_new_tokens:
                    keep.append(r)
            if not keep:
                return result
            if len(keep) < len(rows):
                cache, tokens, rows = cache.select(keep), tokens[keep], [rows[r] for r in keep]
            logits, cache = self.decode(tokens, cache)


def sample(logits: np.ndarray, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           rng: np.random.Generator | None = None) -> np.ndarray:
    """Next token per row of logits [B, V]: argmax at temperature 0, else a draw from `probabilities`."""
    if temperature == 0:
        return logits.argmax(axis=-1).astype(np.int64)
    return draw(probabilities(logits, temperature, top_k, top_p), rng)


def probabilities(logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """What `sample` draws from (temperature > 0), float64 [B, V]: the softmax of logits / temperature
    restricted to the top_k tokens (0 = all) and to the smallest set whose probability reaches top_p."""
    scaled = logits.astype(np.float64) / temperature
    if 0 < top_k < scaled.shape[-1]:
        kth = np.partition(scaled, -top_k, axis=-1)[:, -top_k:].min(axis=-1, keepdims=True)
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    return _nucleus(probs, top_p) if top_p < 1.0 else probs


def draw(probs: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """One token per row of probs [B, V], which need not be normalized (a zero row is not allowed)."""
    rng = rng if rng is not None else np.random.default_rng()
    cumulative = probs.cumsum(axis=-1)
    draws = rng.random((probs.shape[0], 1)) * cumulative[:, -1:]
    return np.minimum((cumulative <= draws).sum(axis=-1), probs.shape[-1] - 1).astype(np.int64)


def _nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Zero every token outside the smallest most-probable set whose mass reaches top_p (the top one stays)."""
    order = np.argsort(-probs, axis=-1, kind="stable")
    sorted_probs = np.take_along_axis(probs, order, axis=-1)
    before = sorted_probs.cumsum(axis=-1) - sorted_probs  # mass of the more probable tokens
    keep = np.zeros_like(probs, dtype=bool)
    np.put_along_axis(keep, order, before < top_p, axis=-1)
    return np.where(keep, probs, 0.0)


def _check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = no limit), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def load(variant_dir: Path | str, device: str = "auto", threads: int | None = None) -> OnnxLM:
    """An OnnxLM on the CUDA provider where onnxruntime has it and device is auto or cuda, else on CPU. A
    phase-split variant (artifact.json `phases`) gets its prefill graph as a second session."""
    resolved = resolve_device(device)
    variant_dir = Path(variant_dir)
    artifact = art.read_artifact(variant_dir)
    phases = artifact.get("phases") or {}
    decode = session(variant_dir / phases.get("decode", {}).get("file", art.MODEL_FILE), resolved, threads=threads,
                     spin_us=SPLIT_DECODE_SPIN_US if phases else None)
    prefill = session(variant_dir / phases["prefill"]["file"], resolved, threads=threads, spin_us=0) if phases else None
    return OnnxLM(decode, artifact, resolved, prefill_session=prefill)


def tokenizer(variant_dir: Path | str):
    """The variant's Hugging Face tokenizer, or None when the directory has no tokenizer files."""
    variant_dir = Path(variant_dir)
    if not any((variant_dir / name).is_file() for name in TOKENIZER_MODEL_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(variant_dir)
