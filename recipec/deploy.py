"""Deployment files for a build's variants: a Triton Inference Server model repository (out/<name>/triton/)
and onnxruntime-genai's genai_config.json (in each variant directory).

Everything is derived from artifact.json (graph inputs/outputs, dims, KV layout), the variant's
generation_config.json and the build's manifest.json (the recipe's serving section), so a config always
matches the graph it describes. docs/deploy.md says what each server can and cannot do with them.

This module imports neither torch nor transformers: it runs in builds and in `recipec deploy` alike.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

from . import artifact as art
from .engine import POLICIES, Policy
from .errors import PassError

TRITON_DIR = "triton"
GENAI_CONFIG = "genai_config.json"
# model_type values whose genai_config.json was run through og.Generator here and gave recipec.runtime's
# greedy tokens (tests/test_deploy.py). onnxruntime-genai 0.18 knows more types (phi3, gemma, ...) but has
# none for mixtral or qwen2_moe; types nobody checked get no config rather than one that may not load.
GENAI_TYPES = ("llama", "mistral", "qwen2")
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
# Dim names the export gives the KV graph (recipec/passes/export.py); warm-up samples are sized from them.
_SEQ, _PAST, _TOTAL = "sequence_length", "past_sequence_length", "total_sequence_length"


class Unsupported(ValueError):
    """A graph or policy that a Triton config cannot express (the message says why)."""


# ---------------------------------------------------------------- Triton

def policy_from_serving(serving: dict[str, Any]) -> Policy:
    """The recipe's serving.batching as an engine Policy; a list of policies (profiled side by side)
    deploys its first."""
    b = serving.get("batching", {})
    name = b.get("policy", "continuous")
    name = name[0] if isinstance(name, list) else name
    return Policy(name, int(b.get("max_batch_size", 8)), float(b.get("max_wait_ms", 5.0)), b.get("max_tokens_per_step"))


def write_triton_repo(build_dir: Path | str, variants: Sequence[str] | None = None, device: str | None = None,
                      policy: Policy | None = None, skip: Callable[[str, str], None] | None = None) -> Path:
    """Write build_dir/triton/<variant>/{config.pbtxt, 1/model.onnx} for each variant (all by default) and
    return the repository. The policy defaults to the recipe's, the device to the one the build ran on.
    A variant Triton cannot express is an error, or, given `skip(variant, reason)`, left out and reported.
    The repository is replaced as a whole, so it never mixes configs of two policies."""
    build_dir = Path(build_dir)
    manifest = read_manifest(build_dir)
    serving = manifest["recipe"]["resolved"].get("serving", {})
    policy = policy or policy_from_serving(serving)
    device = device or manifest.get("device") or "cpu"
    staging = build_dir / f".{TRITON_DIR}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for variant in chosen_variants(manifest, variants, build_dir):
            variant_dir = build_dir / "variants" / variant
            artifact = art.read_artifact(variant_dir)
            try:
                text = triton_config(variant, artifact, policy, device, int(serving.get("threads", 0)),
                                     _warmup_tokens(serving))
            except Unsupported as exc:
                if skip is None:
                    raise PassError(str(exc)) from None
                skip(variant, str(exc))
                continue
            _write_model(staging / variant, variant_dir, artifact, text)
        _replace_dir(staging, build_dir / TRITON_DIR)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return build_dir / TRITON_DIR


def read_manifest(build_dir: Path) -> dict[str, Any]:
    path = Path(build_dir) / "manifest.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PassError(f"{build_dir} is not a recipec build directory (no manifest.json)") from None
    except ValueError as exc:  # not JSON, or not even UTF-8
        raise PassError(f"{path} is not valid JSON ({exc}); rebuild") from None


def chosen_variants(manifest: dict[str, Any], wanted: Sequence[str] | None, build_dir: Path) -> list[str]:
    known = list(manifest.get("variants", {}))
    for name in wanted or []:
        if name not in known:
            raise PassError(f"no variant {name!r} in {build_dir} (variants: {', '.join(known)})")
    return list(wanted) if wanted else known


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
        f'name: "{name}"',
        'backend: "onnxruntime"',
        f"max_batch_size: {policy.max_batch_size}",
    ]


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


# ---------------------------------------------------------------- onnxruntime-genai

def genai_unsupported(artifact: dict[str, Any]) -> str | None:
    """Why onnxruntime-genai cannot run this variant from a genai_config.json, or None when it can."""
    model, graph, kv = artifact["model"], artifact["graph"], artifact.get("kv_cache")
    names = {t["name"] for t in graph["inputs"]}
    if model.get("model_type") not in GENAI_TYPES:
        return (f"model_type {model.get('model_type')!r} is not one recipec checked with onnxruntime-genai "
                f"({', '.join(GENAI_TYPES)})")
    if not kv:
        return "the graph has no KV cache"
    if not {"input_ids", "attention_mask"} <= names or "logits" not in {t["name"] for t in graph["outputs"]}:
        return "the graph lacks input_ids, attention_mask or logits"
    if not model.get("max_position_embeddings"):
        return "the model's context length (max_position_embeddings) is unknown"
    if model.get("eos_token_id") is None:
        return "the model has no eos_token_id, which genai_config.json requires"
    return None


def genai_config(artifact: dict[str, Any], generation: dict[str, Any] | None = None) -> dict[str, Any]:
    """genai_config.json for the variant: the decoder's tensor names from the graph, sizes from the model,
    search defaults from generation_config.json."""
    model, kv = artifact["model"], artifact["kv_cache"]
    eos = model.get("eos_token_id")
    first_eos = eos[0] if isinstance(eos, list) else eos
    pad = model.get("pad_token_id")
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "filename": artifact["graph"]["file"],
        "head_size": kv["head_dim"], "hidden_size": model["hidden_size"],
        "num_attention_heads": model["num_attention_heads"], "num_hidden_layers": kv["num_layers"],
        "num_key_value_heads": kv["num_kv_heads"],
        "inputs": _genai_inputs(artifact), "outputs": _genai_outputs(kv),
    }
    config = {"model": {"type": model["model_type"], "vocab_size": model["vocab_size"],
                        "context_length": model["max_position_embeddings"], "decoder": decoder,
                        "eos_token_id": eos, "pad_token_id": pad if pad is not None else first_eos},
              "search": _genai_search(model["max_position_embeddings"], generation or {})}
    if model.get("bos_token_id") is not None:
        config["model"]["bos_token_id"] = model["bos_token_id"]
    return config


def _genai_inputs(artifact: dict[str, Any]) -> dict[str, str]:
    # logits_to_keep is not named: genai feeds only these, so the graph keeps its default 0 (logits of
    # every position) and genai samples from the last; checked against recipec.runtime in the tests.
    names = {t["name"] for t in artifact["graph"]["inputs"]}
    inputs = {k: k for k in ("input_ids", "attention_mask", "position_ids") if k in names}
    kv = artifact["kv_cache"]
    inputs["past_key_names"] = kv["inputs"]["key"].replace("{i}", "%d")
    inputs["past_value_names"] = kv["inputs"]["value"].replace("{i}", "%d")
    return inputs


def _genai_outputs(kv: dict[str, Any]) -> dict[str, str]:
    return {"logits": "logits", "present_key_names": kv["outputs"]["key"].replace("{i}", "%d"),
            "present_value_names": kv["outputs"]["value"].replace("{i}", "%d")}


def _genai_search(context: int, generation: dict[str, Any]) -> dict[str, Any]:
    # past_present_share_buffer false: our graph returns present = past + new tokens (a growing cache),
    # not a fixed max-length buffer updated in place, which sharing the buffer would need.
    return {"past_present_share_buffer": False, "max_length": context, "min_length": 0, "num_beams": 1,
            "num_return_sequences": 1, "early_stopping": True, "no_repeat_ngram_size": 0, "diversity_penalty": 0.0,
            "length_penalty": 1.0, "do_sample": bool(generation.get("do_sample", False)),
            "temperature": float(generation.get("temperature") or 1.0), "top_k": int(generation.get("top_k") or 50),
            "top_p": float(generation.get("top_p") or 1.0),
            "repetition_penalty": float(generation.get("repetition_penalty") or 1.0)}


def write_genai_config(variant_dir: Path | str) -> Path | None:
    """Write variant_dir/genai_config.json so `onnxruntime_genai.Model(variant_dir)` loads the variant;
    returns its path, or None (removing a stale one) where genai_unsupported() names a reason."""
    variant_dir = Path(variant_dir)
    artifact = art.read_artifact(variant_dir)
    target = variant_dir / GENAI_CONFIG
    if genai_unsupported(artifact):
        target.unlink(missing_ok=True)
        return None
    generation_file = variant_dir / "generation_config.json"
    generation = json.loads(generation_file.read_text()) if generation_file.is_file() else {}
    target.write_text(json.dumps(genai_config(artifact, generation), indent=2) + "\n")
    return target


def write_deploy_files(build_dir: Path | str, device: str | None = None,
                       warn: Callable[[str], None] = lambda message: None) -> Path:
    """What a build writes after its variants: genai_config.json where supported, and the Triton repository.
    A variant Triton cannot express is left out with a warning: the build itself stands."""
    build_dir = Path(build_dir)
    for variant in read_manifest(build_dir).get("variants", {}):
        write_genai_config(build_dir / "variants" / variant)
    return write_triton_repo(build_dir, device=device,
                             skip=lambda variant, reason: warn(f"no Triton model for {variant}: {reason}"))


# ---------------------------------------------------------------- commands

def add_deploy_commands(sub) -> None:
    p = sub.add_parser("deploy", help="write serving configs for a build (Triton repository, onnxruntime-genai)")
    targets = p.add_subparsers(metavar="TARGET")
    t = targets.add_parser("triton", help="write OUT/NAME/triton/: config.pbtxt and model per variant")
    t.add_argument("build_dir", type=Path, help="out/<name>")
    t.add_argument("--variant", action="append", help="only this variant (repeatable; default all)")
    t.add_argument("--device", choices=list(INSTANCE_KINDS), help="instance kind (default: the build's device)")
    t.add_argument("--policy", choices=list(POLICIES), help="batching policy (default: the recipe's)")
    t.add_argument("--max-batch-size", type=int, help="default: the recipe's")
    t.add_argument("--max-wait-ms", type=float, help="default: the recipe's")
    t.set_defaults(handler=cmd_deploy_triton)
    g = targets.add_parser("genai", help="write genai_config.json into each variant onnxruntime-genai can run")
    g.add_argument("build_dir", type=Path, help="out/<name>")
    g.add_argument("--variant", action="append", help="only this variant (repeatable; default all)")
    g.set_defaults(handler=cmd_deploy_genai)
    p.set_defaults(handler=lambda args: _usage(p))


def _usage(parser) -> int:
    from .cli import UsageError

    raise UsageError(f"{parser.prog}: name a target: triton or genai")


def command_manifest(build_dir: Path, variants: Sequence[str] | None) -> dict[str, Any]:
    """The build's manifest for a command: a missing build or an unknown variant is a usage error (exit 2)."""
    from .cli import UsageError

    try:
        manifest = read_manifest(build_dir)
        chosen_variants(manifest, variants, build_dir)
    except PassError as exc:
        raise UsageError(str(exc)) from None
    return manifest


def override_policy(base: Policy, args, command: str) -> Policy:
    """The recipe's batching policy with the command line's --policy/--max-batch-size/--max-wait-ms applied."""
    from .cli import UsageError

    overrides = {"batching": args.policy, "max_batch_size": args.max_batch_size, "max_wait_ms": args.max_wait_ms}
    try:
        return Policy(**{**base.__dict__, **{k: v for k, v in overrides.items() if v is not None}})
    except ValueError as exc:
        raise UsageError(f"{command}: {exc}") from None


def cmd_deploy_triton(args) -> int:
    from . import console
    from .cli import EXIT_OK

    manifest = command_manifest(args.build_dir, args.variant)
    policy = override_policy(policy_from_serving(manifest["recipe"]["resolved"].get("serving", {})), args,
                             "deploy triton")
    repo = write_triton_repo(args.build_dir, args.variant, args.device, policy)
    console.say(f"wrote {repo} ({policy.batching} batching): tritonserver --model-repository {repo.resolve()}")
    return EXIT_OK


def cmd_deploy_genai(args) -> int:
    from . import console
    from .cli import EXIT_OK

    manifest = command_manifest(args.build_dir, args.variant)
    for variant in chosen_variants(manifest, args.variant, args.build_dir):
        variant_dir = args.build_dir / "variants" / variant
        written = write_genai_config(variant_dir)
        if written:
            console.say(f"wrote {written}")
        else:
            console.warn(f"{variant}: no genai_config.json: {genai_unsupported(art.read_artifact(variant_dir))}")
    return EXIT_OK
