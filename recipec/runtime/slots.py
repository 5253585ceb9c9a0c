"""Slot batching over a shared past/present KV buffer: a decode loop in which nothing grows per step.

A graph fused with `kv_buffer: shared` (artifact.json kv_cache.buffer "shared") takes right-padded rows whose
lengths come from the attention mask, and its GroupQueryAttention writes each row's new keys at that row's own
length. So one buffer per layer tensor, [slots, kv_heads, capacity, head_dim] on the session's device, can be
bound as both past and present and is written in place:

- prefill binds one slot's row (a pointer into the buffer) at batch 1, so the prompt's keys land in its slot;
- a decode step binds the rows from the lowest to the highest slot in use as one batch; a row in that span
  that is not in the batch (free, or another batch's) is fed a padding token at its own length + 1, which
  writes only past its valid data, and its length does not move;
- joining and leaving a batch (`SlotBatch.select` / `merge`, what the engine calls) move slot numbers, never
  the cache.

A slot is in use while a live SlotBatch names it (a batch the engine drops frees its slots with it). The
buffer starts at `capacity` columns and doubles, on the device, when a row would outgrow it: a copy per
doubling, not per step. What is reused across steps: the buffers, one IOBinding per session whose cache
bindings change only when the span or the capacity does, and a decode step's inputs while its batch stays the
same (`_DecodeFeed`: token ids and logits in arrays rewritten in place, position ids aliasing the slot
lengths). A decode step then binds only the attention mask [span, width], the one input that grows with the
context (int64 ones, as onnxruntime-genai feeds it; for one row, an OrtValue per width over a preallocated row
of ones). On the 2-core bench hosts this host work is ~25 us per one-row step (it was ~60 us in numpy calls),
against ~330 us for the session run of a 5M-parameter int4 model.
"""
from __future__ import annotations

import time
import weakref
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from recipec.onnx import artifact as art
from recipec.onnx import requires

_ELEMENT_TYPES = {"float32": np.float32, "float16": np.float16, "int8": np.int8}
DEFAULT_CAPACITY = 256


@dataclass(eq=False)
class SlotBatch:
    """The engine's cache handle: row r of the batch is slot slots[r] of the pool."""

    pool: "SlotLM"
    slots: list[int]

    def __post_init__(self):
        self.pool._live.add(self)

    @property
    def batch_size(self) -> int:
        return len(self.slots)

    @property
    def seq_len(self) -> int:
        return max((int(self.pool.lengths[s]) for s in self.slots), default=0)

    def select(self, rows: Sequence[int]) -> "SlotBatch":
        return SlotBatch(self.pool, [self.slots[r] for r in rows])

    def merge(self, other: "SlotBatch") -> "SlotBatch":
        if other.pool is not self.pool:
            raise ValueError("cannot merge slot batches of two pools")
        return SlotBatch(self.pool, self.slots + other.slots)


class SlotLM:
    """An OnnxLM's step API (prefill / decode, what runtime.engine drives) over shared-buffer slots."""

    def __init__(self, lm: Any, slots: int, capacity: int = DEFAULT_CAPACITY):
        kv = lm.artifact["kv_cache"]
        if kv.get("buffer") != "shared":
            raise ValueError("slot batching needs a graph fused with kv_buffer: shared")
        self.lm, self.num_slots = lm, slots
        self.context_length = lm.artifact["model"].get("max_position_embeddings") or 1 << 30
        self.eos_token_ids, self.vocab_size = lm.eos_token_ids, lm.vocab_size
        self.session_seconds: float | None = None
        self.lengths = np.zeros(slots, np.int64)  # tokens each slot holds
        self._live: weakref.WeakSet[SlotBatch] = weakref.WeakSet()
        self._dtype = np.dtype(_ELEMENT_TYPES[kv["dtype"]])
        self._past = art.kv_names(kv["inputs"], kv["num_layers"])
        self._present = art.kv_names(kv["outputs"], kv["num_layers"])
        self._bindings: dict[str, tuple[Any, tuple[int, int, int] | None]] = {}
        self._set_capacity(min(capacity, self.context_length))
        self._buffers = self._allocate(self.capacity)
        self._logits: dict[tuple[str, int, int], tuple[np.ndarray, Any]] = {}
        self._keeps: dict[int, Any] = {}
        limits = {entry.get("id") for entry in (lm.artifact.get("requires") or {}).get("limits", [])}
        self._batched_chunks = requires.BATCH_1_CHUNKS not in limits  # read once: `verifies` runs every step

    def __getattr__(self, name: str) -> Any:
        """Everything else (forward, generate's helpers, device, artifact) is the wrapped OnnxLM's."""
        if name == "lm":
            raise AttributeError(name)
        return getattr(self.lm, name)

    # --- the engine's step API -------------------------------------------------------------------------

    def prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, SlotBatch]:
        """Each prompt into a free slot of its own; logits of each prompt's last token [B, V]."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("prefill needs at least one prompt and no empty prompt")
        batch = SlotBatch(self, [])
        rows = []
        for prompt in prompts:
            slot = self._free_slot()
            batch.slots.append(slot)  # the batch holds it from here, so the next prompt gets another
            self._reserve(len(prompt) + 1)
            ids = np.asarray(prompt, np.int64)[None, :]
            rows.append(self._step("prefill", slot, slot + 1, ids, np.arange(ids.shape[1])[None, :])[0].copy())
            self.lengths[slot] = len(prompt)
        return np.stack(rows), batch

    def decode(self, tokens: Sequence[int] | np.ndarray, batch: SlotBatch) -> tuple[np.ndarray, SlotBatch]:
        """One new token per row of the batch, written in place; logits [B, V]. A row of the span that is not in
        the batch is fed a padding token at its own length, which writes only past its own data.

        While the batch stays the same, a step is a few operations on objects the last step left (its feed):
        after a session run has been through the caches, each Python or numpy call here costs microseconds
        (on the bench host, 15-20 us for a numpy ufunc or an input bound from numpy against 1 us in a loop),
        and at 5M parameters they added ~15% to a step. A one-row span, the latency case, makes no numpy call."""
        feed = self._decode_feed(batch.slots)
        width = feed.width()
        if width > self.capacity:
            self._reserve(width)  # a new capacity drops the feed and the bindings
            feed = self._decode_feed(batch.slots)
        feed.put(tokens)
        if self._fed is not feed:  # another batch's step, or verify's (_step), bound other inputs
            feed.bind(self._binding("decode", self.lm.session, feed.low, feed.high), self.lm._info["decode"],
                      self._keep_value(1))
            self._fed = feed
        self._bind_mask(feed.binding, feed.lengths, width)
        self._run(self.lm.session, feed.binding)
        feed.advance()
        return (feed.last.copy() if feed.whole_span else feed.last[feed.rows]), batch

    def verify(self, tokens: np.ndarray, batch: SlotBatch) -> np.ndarray:
        """Speculative verification: every row feeds its S tokens [last, proposals...] after its cache, all
        written in place; logits [B, S, V] after each. The rows' lengths grow by S: `keep` then takes back
        what the target rejected, which is free here (a length, not a copy)."""
        tokens = np.asarray(tokens, np.int64)
        if tokens.ndim != 2 or tokens.shape[0] != batch.batch_size:
            raise ValueError(f"verify got tokens of shape {tokens.shape} for a batch of {batch.batch_size} rows")
        if not self.verifies(batch):
            raise ValueError("this graph runs steps of several tokens after a past at batch 1 only "
                             "(artifact.json requires.limits): verify one row at a time")
        width = tokens.shape[1]
        low, high = min(batch.slots), max(batch.slots) + 1
        self._reserve(int(self.lengths[low:high].max()) + width)
        rows = np.asarray(batch.slots) - low
        ids = np.full((high - low, width), self.lm.pad_token_id, np.int64)
        ids[rows] = tokens
        positions = self.lengths[low:high, None] + np.arange(width)[None, :]
        logits = self._step("decode", low, high, ids, positions, keep=width)
        self.lengths[batch.slots] += width
        return logits[rows]

    def keep(self, batch: SlotBatch, dropped: Sequence[int]) -> None:
        """Forget the last dropped[r] tokens of row r (the proposals the target rejected)."""
        self.lengths[batch.slots] -= np.asarray(dropped, np.int64)

    def verifies(self, batch: SlotBatch) -> bool:
        """Whether `verify` runs this batch in one call: GroupQueryAttention without query_seqlens (a graph
        for an older onnxruntime) takes several new tokens after a past at batch 1 only."""
        return self._batched_chunks or max(batch.slots) == min(batch.slots)

    # --- slots and buffers ------------------------------------------------------------------------------

    def in_use(self) -> set[int]:
        return {slot for batch in list(self._live) for slot in batch.slots}

    def buffer_pointers(self) -> list[int]:
        """Device addresses of the per-layer buffers (tests check that steps write them in place)."""
        return [buffer.data_ptr() for buffer in self._buffers]

    def _free_slot(self) -> int:
        used = self.in_use()
        slot = next((s for s in range(self.num_slots) if s not in used), None)
        if slot is None:
            raise RuntimeError(f"all {self.num_slots} slots are in use")
        self.lengths[slot] = 0
        return slot

    def _reserve(self, columns: int) -> None:
        if columns > self.context_length:
            raise ValueError(f"a sequence of {columns} tokens exceeds the model's context of {self.context_length}")
        if columns <= self.capacity:
            return
        capacity = min(max(columns, 2 * self.capacity), self.context_length)
        self._buffers = self.lm._kv_ops.widen(self._buffers, capacity - self.capacity)
        self._set_capacity(capacity)

    def _set_capacity(self, capacity: int) -> None:
        self.capacity = capacity
        self._bindings.clear()
        self._feed = self._fed = None
        self._ones = np.ones((1, capacity), np.int64)  # a one-row span's mask is a view of it
        self._one_row_masks: dict[int, Any] = {}  # width -> OrtValue of that view
        self._columns = np.arange(capacity)

    def _allocate(self, capacity: int) -> list[Any]:
        import onnxruntime

        # onnxruntime owns this memory (a CPU OrtValue made from numpy would alias the array); columns past a
        # row's length are never read, so they need no zeros
        shape = [self.num_slots, self.lm.kv_heads, capacity, self.lm.head_dim]
        return [onnxruntime.OrtValue.ortvalue_from_shape_and_type(shape, self._dtype, self.lm.device)
                for _ in self._past]

    # --- one session run --------------------------------------------------------------------------------

    def _step(self, phase: str, low: int, high: int, ids: np.ndarray, positions: np.ndarray,
              keep: int = 1) -> np.ndarray:
        """Logits of the last `keep` positions: [rows, V] for one, else [rows, keep, V]. The next step of the
        phase may write over them (see _logits_buffer): copy what you keep."""
        sess = self.lm.prefill_session if phase == "prefill" else self.lm.session
        info = self.lm._info[phase]
        binding = self._binding(phase, sess, low, high)
        if phase == "decode":
            self._fed = None  # the inputs bound here (verify's) replace a decode feed's
        binding.bind_cpu_input("input_ids", ids)
        last = positions[:, -1]
        self._bind_mask(binding, last, int(last.max()) + 1)
        if info.position_ids:
            binding.bind_cpu_input("position_ids", positions.astype(np.int64))
        if info.select_logits:
            binding.bind_ortvalue_input(art.LOGITS_TO_KEEP, self._keep_value(keep))
        # the logits output holds `keep` positions when the graph selects them or every fed one is kept
        owned = (self._logits_buffer(phase, high - low, keep, binding)
                 if info.select_logits or ids.shape[1] == keep else None)
        if owned is None:
            binding.bind_output("logits", "cpu")
        self._run(sess, binding)
        if owned is not None:  # callers copy the rows they keep (decode's row selection, prefill's stack)
            return owned[:, -1] if keep == 1 else owned
        logits = binding.get_outputs()[-1].numpy()
        return logits[:, -1] if keep == 1 else logits[:, -keep:]

    def _keep_value(self, keep: int) -> Any:
        """logits_to_keep as an OrtValue, made once per value (verify keeps the same K + 1 every step)."""
        if keep not in self._keeps:
            self._keeps[keep] = _ortvalue(np.array(keep, np.int64))
        return self._keeps[keep]

    def _decode_feed(self, slots: list[int]) -> "_DecodeFeed":
        """The last batch's feed, or a new one when the batch changed (a request joined or left)."""
        feed = self._feed  # a new capacity drops it (_set_capacity)
        if feed is None or feed.slots != slots:
            feed = self._feed = _DecodeFeed.make(self, slots)
        return feed

    def _run(self, sess: Any, binding: Any) -> None:
        started = time.perf_counter()
        sess.run_with_iobinding(binding)
        self.session_seconds = time.perf_counter() - started

    def _bind_mask(self, binding: Any, last: np.ndarray, width: int) -> None:
        """attention_mask [rows, width]: ones up to each row's last fed position (width = the longest row's
        last position + 1). One row's is all ones: an OrtValue over a preallocated row, made once per width."""
        if last.shape[0] > 1:
            binding.bind_cpu_input("attention_mask", (self._columns[:width] <= last[:, None]).astype(np.int64))
            return
        mask = self._one_row_masks.get(width)
        if mask is None:
            mask = self._one_row_masks[width] = _ortvalue(self._ones[:, :width])
        binding.bind_ortvalue_input("attention_mask", mask)

    def _logits_buffer(self, phase: str, rows: int, positions: int, binding: Any) -> np.ndarray:
        """A step whose logits output has a known shape writes into an array of ours bound as the output: no
        allocation per step, and no Python objects for every present output to fetch the logits."""
        array, value = self._logits_output(phase, rows, positions)
        binding.bind_ortvalue_output("logits", value)
        return array

    def _logits_output(self, phase: str, rows: int, positions: int = 1) -> tuple[np.ndarray, Any]:
        """[rows, positions, vocab] logits and the OrtValue that aliases it, one per phase and shape."""
        key = (phase, rows, positions)
        if key not in self._logits:
            array = np.empty((rows, positions, self.vocab_size), self.lm.logits_dtype)
            self._logits[key] = (array, _ortvalue(array))  # a CPU OrtValue from numpy aliases the array
        return self._logits[key]

    def _binding(self, phase: str, sess: Any, low: int, high: int) -> Any:
        """The phase's IOBinding with rows [low, high) of every buffer bound as past and present (rebound
        only when the rows or the capacity changed)."""
        binding, bound = self._bindings.get(phase, (None, None))
        key = (low, high, self.capacity)
        if binding is None:
            binding = sess.io_binding()
        if bound != key:
            shape = [high - low, self.lm.kv_heads, self.capacity, self.lm.head_dim]
            row_bytes = self.lm.kv_heads * self.capacity * self.lm.head_dim * self._dtype.itemsize
            device = "cuda" if self.lm.device == "cuda" else "cpu"
            for past, present, buffer in zip(self._past, self._present, self._buffers, strict=True):
                address = buffer.data_ptr() + low * row_bytes
                binding.bind_input(past, device, 0, self._dtype, shape, address)
                binding.bind_output(present, device, 0, self._dtype, shape, address)
        self._bindings[phase] = (binding, key)
        return binding


@dataclass(eq=False)
class _DecodeFeed:
    """A decode step's inputs for one batch: arrays rewritten in place and bound as OrtValues that alias them,
    so a step of the same batch binds only its mask, whose width grows. position_ids aliases the pool's
    lengths (the positions of the new tokens are the lengths before the step)."""

    slots: list[int]  # the batch's, in its order
    low: int  # the span of slots the step runs: [low, high)
    high: int
    rows: Any  # the batch's rows in the span: a slice when the batch is the whole span in order
    whole_span: bool
    lengths: np.ndarray  # the pool's lengths of the span (a view)
    ids: np.ndarray  # [span, 1]; padding in rows outside the batch
    last: np.ndarray  # [span, vocab]: the pool's decode logits buffer for this span, its one position
    values: dict[str, Any]  # OrtValues aliasing ids, logits and the span's lengths (position ids)
    one: bool  # a one-row span: its length and token are read and written as Python ints (memoryviews)
    length_view: memoryview
    id_view: memoryview
    binding: Any = None  # the decode IOBinding, once bound

    @classmethod
    def make(cls, pool: "SlotLM", slots: list[int]) -> "_DecodeFeed":
        low, high = min(slots), max(slots) + 1
        whole = slots == list(range(low, high))
        rows = slice(None) if whole else np.asarray(slots) - low
        ids = np.full((high - low, 1), pool.lm.pad_token_id, np.int64)
        logits, logits_value = pool._logits_output("decode", high - low)
        lengths = pool.lengths[low:high]
        values = {"input_ids": _ortvalue(ids), "position_ids": _ortvalue(lengths[:, None]), "logits": logits_value}
        return cls(list(slots), low, high, rows, whole, lengths, ids, logits[:, -1], values, high - low == 1,
                   memoryview(lengths), memoryview(ids.reshape(-1)))

    def width(self) -> int:
        """The mask's width this step: the longest row's length after it."""
        return (self.length_view[0] if self.one else int(self.lengths.max())) + 1

    def put(self, tokens: Sequence[int] | np.ndarray) -> None:
        if self.one and isinstance(tokens, list) and len(tokens) == 1:  # what the engine passes
            self.id_view[0] = int(tokens[0])
            return
        tokens = np.asarray(tokens, np.int64).reshape(-1)
        if tokens.shape[0] != len(self.slots):
            raise ValueError(f"decode got {tokens.shape[0]} tokens for a batch of {len(self.slots)} rows")
        self.ids[self.rows, 0] = tokens

    def advance(self) -> None:
        if self.one:
            self.length_view[0] += 1
        else:
            self.lengths[self.rows] += 1

    def bind(self, binding: Any, info: Any, one: Any) -> None:
        binding.bind_ortvalue_input("input_ids", self.values["input_ids"])
        if info.position_ids:
            binding.bind_ortvalue_input("position_ids", self.values["position_ids"])
        if info.select_logits:
            binding.bind_ortvalue_input(art.LOGITS_TO_KEEP, one)
        binding.bind_ortvalue_output("logits", self.values["logits"])
        self.binding = binding


def _ortvalue(array: np.ndarray) -> Any:
    import onnxruntime

    return onnxruntime.OrtValue.ortvalue_from_numpy(array)


def step_model(lm: Any, slots: int, capacity: int = DEFAULT_CAPACITY) -> Any:
    """What an engine should drive for `lm`: slots over a shared-buffer graph, else the OnnxLM itself."""
    artifact = getattr(lm, "artifact", None) or {}  # a test's fake model has none
    if (artifact.get("kv_cache") or {}).get("buffer") == "shared":
        return SlotLM(lm, slots, capacity)
    return lm
