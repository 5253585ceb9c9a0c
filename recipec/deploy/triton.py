"""A Triton Inference Server model repository for a build (out/<name>/triton/): per variant a config.pbtxt
derived from artifact.json (graph inputs/outputs, dims, KV layout) and the recipe's serving section, and
the variant's graph as 1/model.onnx, so a config always matches the graph it describes. docs/deploy.md says
what Triton can and cannot do with them.

This module imports neither torch nor transformers: it runs in builds and in `recipec deploy` alike.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

from recipec.core import builddir
from recipec.errors import PassError
from recipec.onnx import artifact as art
from recipec.runtime.engine import POLICIES, Policy, policy_from_serving

TRITON_DIR = "triton"
# Triton's DataType names (model_config.proto) for the numpy dtype names artifact.json uses.
TRITON_DTYPES = {
    "bool": "TYPE_BOOL", "uint8": "TYPE_UINT8", "uint16": "TYPE_UINT16", "uint32": "TYPE_UINT32",
    "uint64": "TYPE_UINT64", "int8": "TYPE_INT8", "int16": "TYPE_INT16", "int32": "TYPE_INT32",
    "int64": "TYPE_INT64", "float16": "TYPE_FP16", "float32": "TYPE_FP32", "float64": "TYPE_FP64",
    "bfloat16": "TYPE_BF16",
}
INSTANCE_KINDS = {"cpu": "KIND_CPU", "cuda": "KIND_GPU", "auto": "KIND_AUTO"}
# Triton ends a sequence whose client sent nothing for this long and frees its slot and KV state.
SEQUENCE_IDLE_US = 10_000_000
# Dim names the export gives the KV graph (recipec/passes/onnx/export.py); warm-up samples are sized from them.
_SEQ, _PAST, _TOTAL = "sequence_length", "past_sequence_length", "total_sequence_length"


class Unsupported(PassError):
    """A graph or policy that a Triton config cannot express (the message says why)."""


def write_triton_repo(build_dir: Path | str, manifest: dict[str, Any], variants: Sequence[str] | None = None,
                      device: str | None = None, policy: Policy | None = None,
                      skip: Callable[[str, str], None] | None = None) -> Path:
    """Write build_dir/triton/<variant>/{config.pbtxt, 1/model.onnx} for each variant (all by default) of the
    build whose manifest.json is `manifest`, and return the repository. The policy defaults to the recipe's,
    the device to the one the build ran on. A variant Triton cannot express is an error, or, given
    `skip(variant, reason)`, left out and reported. The repository is replaced as a whole, so it never
    mixes configs of two policies."""
    build_dir = Path(build_dir)
    serving = manifest["recipe"]["resolved"].get("serving", {})
    policy = policy or policy_from_serving(serving)
    device = device or manifest.get("device") or "cpu"
    staging = build_dir / f".{TRITON_DIR}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for variant in builddir.chosen_variants(manifest, variants, build_dir):
            variant_dir = builddir.variant_dir(build_dir, variant)
            artifact = art.read_artifact(variant_dir)
            try:
                text = triton_config(variant, artifact, policy, device, int(serving.get("threads", 0)),
                                     _warmup_tokens(serving))
            except Unsupported as exc:
                if skip is None:
                    raise
                skip(variant, str(exc))
                continue
            _write_model(staging / variant, variant_dir, artifact, text)
        _replace_dir(staging, build_dir / TRITON_DIR)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return build_dir / TRITON_DIR


def _warmup_tokens(serving: dict[str, Any]) -> int:
    """The workload's prompt length (the longest of a range): warm-up runs the shapes the recipe measures."""
    prompt = serving.get("workload", {}).get("prompt_tokens", 128)
    return int(prompt["max"]) if isinstance(prompt, dict) else int(prompt)


def _write_model(model_dir: Path, variant_dir: Path, artifact: dict[str, Any], config: str) -> None:
    """1/model.onnx is the graph; with external weights it is a directory holding the graph and its data
    files, which the onnxruntime backend loads as <dir>/model.onnx (onnxruntime_backend's LoadModel)."""
    version = model_dir / "1"
    version.mkdir(parents=True)
    graph = artifact["graph"]
    external = graph.get("external_data") or []
    if external:
        target = version / art.MODEL_FILE
        target.mkdir()
        for name in [graph["file"], *external]:
            _link_or_copy(variant_dir / name, target / Path(name).name)
    else:
        _link_or_copy(variant_dir / graph["file"], version / art.MODEL_FILE)
    (model_dir / "config.pbtxt").write_text(config)


def _link_or_copy(src: Path, dst: Path) -> None:
    # A hard link costs no disk for multi-GB weights; across filesystems it fails and we copy.
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _replace_dir(new: Path, target: Path) -> None:
    if not new.exists():
        new.mkdir()
    old = target.with_name(f".{target.name}-old-{os.getpid()}")
    if target.exists():
        os.rename(target, old)
    os.rename(new, target)
    shutil.rmtree(old, ignore_errors=True)


def triton_config(name: str, artifact: dict[str, Any], policy: Policy, device: str = "cpu", threads: int = 0,
                  warmup_tokens: int = 16) -> str:
    """config.pbtxt text for one variant under `policy` (static, dynamic or continuous)."""
    if policy.batching not in POLICIES:
        raise Unsupported(f"unknown batching policy {policy.batching!r} (expected one of {', '.join(POLICIES)})")
    if device not in INSTANCE_KINDS:
        raise Unsupported(f"unknown device {device!r} (expected one of {', '.join(INSTANCE_KINDS)})")
    if artifact.get("phases"):
        # One Triton model is one graph; choosing a graph per phase would need a BLS or ensemble model that
        # routes prompts and decode steps and hands the cache between them, which recipec does not write.
        raise Unsupported("a phase-split variant runs prefill.onnx for prompts and model.onnx for decode "
                          "steps, and a Triton onnxruntime model serves one graph (docs/phase-split.md)")
    graph = artifact["graph"]
    _check_batchable(name, graph)
    states = kv_states(artifact) if policy.batching == "continuous" else []
    stateful = {n for pair in states for n in pair}
    inputs = [i for i in graph["inputs"] if i["name"] not in stateful]
    outputs = [o for o in graph["outputs"] if o["name"] not in stateful]
    lines = _header(name, policy, device, artifact)
    lines += _io_section("input", inputs) + _io_section("output", outputs)
    lines += _instance_group(device) + _threads(threads)
    lines += _scheduler(policy, states, artifact)
    lines += _warmup(inputs, policy, artifact, warmup_tokens)
    return "\n".join(lines) + "\n"


def _check_batchable(name: str, graph: dict[str, Any]) -> None:
    """Triton batches along the first dim of every input and output; a graph with a fixed first dim
    cannot batch at all."""
    for tensor in graph["inputs"] + graph["outputs"]:
        shape = tensor["shape"]
        if not shape or isinstance(shape[0], int):
            raise Unsupported(f"variant {name!r}: {tensor['name']} has shape {shape}; Triton batching needs a "
                              "dynamic first (batch) dim on every input and output")
        if tensor["dtype"] not in TRITON_DTYPES:
            raise Unsupported(f"variant {name!r}: {tensor['name']} has dtype {tensor['dtype']}, which Triton's "
                              "model config cannot express")


def _header(name: str, policy: Policy, device: str, artifact: dict[str, Any]) -> list[str]:
    optional = ", ".join(o["name"] for o in artifact["graph"]["optional_inputs"]) or "none"
    return [
        f"# Written by recipec from variants/{name}/artifact.json; the recipe's batching policy is "
        f"{policy.batching!r} (max_batch_size {policy.max_batch_size}, max_wait_ms {policy.max_wait_ms:g}).",
        "# With max_batch_size > 0 Triton prepends the batch dim itself: every dims below leaves it out,",
        "# and -1 marks a dim that varies per request (sequence and cache lengths).",
        f"# Optional graph inputs ({optional}) are initializers with a default; they are not listed because the",
        "# onnxruntime backend refuses optional inputs on a model that batches, so they keep their default",
        "# (logits_to_keep 0: logits of every position; a client reads the last one).",
        *_runtime_lines(artifact),
        f'name: "{name}"',
        'backend: "onnxruntime"',
        f"max_batch_size: {policy.max_batch_size}",
    ]


def _runtime_lines(artifact: dict[str, Any]) -> list[str]:
    """The onnxruntime the backend must carry: Triton's onnxruntime backend bundles its own, often older."""
    needs = artifact.get("requires")
    if needs is None:
        return ["# artifact.json does not record the onnxruntime this graph needs; rebuild the variant to find out."]
    because = f" ({'; '.join(needs['because'])})" if needs["because"] else ""
    return [f"# The graph needs onnxruntime >= {needs['onnxruntime']}{because}: this Triton's onnxruntime backend",
            "# must carry that release or a newer one; target_onnxruntime builds for an older one (docs/deploy.md)."]


def _dims(shape: Sequence[Any]) -> list[int]:
    """Triton dims without the batch dim; symbolic or unknown dims become -1."""
    return [d if isinstance(d, int) else -1 for d in shape[1:]]


def _list(values: Sequence[Any]) -> str:
    return "[ " + ", ".join(str(v) for v in values) + " ]"


def _io_section(kind: str, tensors: list[dict[str, Any]]) -> list[str]:
    entries = [f'  {{ name: "{t["name"]}" data_type: {TRITON_DTYPES[t["dtype"]]} dims: {_list(_dims(t["shape"]))} }}'
               for t in tensors]
    return [f"{kind} ["] + [e + ("," if i < len(entries) - 1 else "") for i, e in enumerate(entries)] + ["]"]


def _instance_group(device: str) -> list[str]:
    return ["# One instance on the serving device (the recipe's serving.device, resolved where the build ran).",
            f"instance_group [ {{ count: 1 kind: {INSTANCE_KINDS[device]} }} ]"]


def _threads(threads: int) -> list[str]:
    if threads <= 0:
        return []
    return ["# The recipe's serving.threads: onnxruntime intra-op threads.",
            f'parameters {{ key: "intra_op_thread_count" value: {{ string_value: "{threads}" }} }}']


def _scheduler(policy: Policy, states: list[tuple[str, str]], artifact: dict[str, Any]) -> list[str]:
    delay_us = int(round(policy.max_wait_ms * 1000))
    if policy.batching == "static":
        return [
            "# static: no scheduler. Each request runs as its client sent it, a batch of up to max_batch_size",
            "# rows formed by the client, as recipec's static policy runs fixed batches to completion.",
            "# Triton's onnxruntime backend turns dynamic batching on by itself when max_batch_size > 1 and no",
            "# scheduler is set, but only while auto-completing a config; it skips auto-completion when the",
            "# config lists inputs and outputs, as this one does (onnxruntime_backend AutoCompleteConfig), and",
            "# a server started with --disable-auto-complete-config never auto-completes.",
        ]
    if policy.batching == "dynamic":
        return [
            "# dynamic: a batch launches when max_batch_size requests wait or the oldest has waited max_wait_ms.",
            "# Triton batches only requests whose inputs have equal shapes: same new-token count and cache length.",
            f"dynamic_batching {{ preferred_batch_size: [ {policy.max_batch_size} ] "
            f"max_queue_delay_microseconds: {delay_us} }}",
        ]
    return _sequence_batching(policy, states, artifact, delay_us)


def _sequence_batching(policy: Policy, states: list[tuple[str, str]], artifact: dict[str, Any],
                       delay_us: int) -> list[str]:
    kv = artifact["kv_cache"]
    dtype = TRITON_DTYPES[kv["dtype"]]
    dims = [kv["num_kv_heads"], -1, kv["head_dim"]]
    first = [kv["num_kv_heads"], 1, kv["head_dim"]]
    entries = [
        f'    {{ input_name: "{i}" output_name: "{o}" data_type: {dtype} dims: {_list(dims)}\n'
        f'      initial_state: {{ data_type: {dtype} dims: {_list(first)} zero_data: true name: "empty cache" }} }}'
        for i, o in states]
    return [
        "# continuous: the closest Triton has. A client sends a sequence (one correlation id) of requests:",
        "# the prompt, then one token per request; Triton keeps each sequence's KV cache as implicit state",
        "# (past_key_values.* in, present.* out). Its first request gets a one-position zero cache, because",
        "# initial states have fixed dims: the client prepends a 0 to attention_mask to mask that position.",
        "# The 'oldest' strategy batches steps of different sequences only when their shapes are equal (same",
        "# cache length), so this is not iteration-level batching: the onnxruntime backend has none.",
        "# Triton pairs states by sorted name order (server issue #8586); recipec checked that the sorted",
        "# input and output names pair as listed.",
        "# No model_warmup: a warm-up sample cannot feed state inputs, which Triton owns here.",
        "sequence_batching {",
        f"  max_sequence_idle_microseconds: {SEQUENCE_IDLE_US}",
        f"  oldest {{ max_candidate_sequences: {policy.max_batch_size} preferred_batch_size: "
        f"[ {policy.max_batch_size} ] max_queue_delay_microseconds: {delay_us} }}",
        "  state [",
        *[e + ("," if n < len(entries) - 1 else "") for n, e in enumerate(entries)],
        "  ]",
        "}",
    ]


def kv_states(artifact: dict[str, Any]) -> list[tuple[str, str]]:
    """(past input, present output) of each layer's key and value, in sorted input-name order.

    Triton's core pairs an output state with the input state at the same index of two name-sorted maps
    (triton-inference-server/server#8586) instead of the pairs the config lists; where the two sorted
    orders differ it would feed one layer's cache to another. Our names differ only in a shared prefix
    ("past_key_values." / "present."), so both sides sort alike (…1.value, 10.key, …, 2.key on both);
    any other naming is checked and refused with the reason."""
    kv = artifact.get("kv_cache")
    if not kv:
        raise Unsupported("continuous batching in Triton keeps the KV cache as implicit state, but this graph "
                          "has no past_key_values inputs")
    pairs = sorted(zip(art.kv_names(kv["inputs"], kv["num_layers"]), art.kv_names(kv["outputs"], kv["num_layers"])))
    if [o for _, o in pairs] != sorted(o for _, o in pairs):
        raise Unsupported("Triton would pair these KV states wrongly: the sorted order of the present.* output "
                          "names differs from that of the past inputs (triton-inference-server/server#8586); "
                          "rename the graph's cache tensors so both sort alike")
    return pairs


def _warmup(inputs: list[dict[str, Any]], policy: Policy, artifact: dict[str, Any], tokens: int) -> list[str]:
    """A prefill-shaped and a decode-shaped warm-up at full batch, so the first client requests do not pay
    for onnxruntime's first-run allocations. Sized from the export's dim names; a graph with other
    dynamic dims gets none rather than a guess."""
    if policy.batching == "continuous":
        return []
    samples = {"prefill": {_SEQ: tokens, _PAST: 1, _TOTAL: tokens + 1},
               "decode": {_SEQ: 1, _PAST: tokens, _TOTAL: tokens + 1}}
    rendered = []
    for sample, sizes in samples.items():
        entries = []
        for tensor in inputs:
            dims = [d if isinstance(d, int) else sizes.get(d) for d in tensor["shape"][1:]]
            if None in dims:
                return ["# No model_warmup: the graph has dynamic dims whose size recipec cannot choose."]
            entries.append(f'    inputs {{ key: "{tensor["name"]}" value: {{ data_type: '
                           f'{TRITON_DTYPES[tensor["dtype"]]} dims: {_list(dims)} zero_data: true }} }}')
        rendered.append(f'  {{ name: "{sample}" batch_size: {policy.max_batch_size} count: 1\n'
                        + "\n".join(entries) + " }")
    return ["# Zero inputs are valid: token id 0 exists and an all-zero attention_mask only masks.",
            "model_warmup [", ",\n".join(rendered), "]"]
