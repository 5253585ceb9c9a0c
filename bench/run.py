"""recipec against the baseline a user starts from and against its peers, on one machine, in one run.

    python bench/run.py [--size small|medium] [--out bench/results] [--threads N] [--skip-peers] [--resume]
    python bench/run.py --render bench/results/<file>.json    # rewrite docs/benchmarks.md's section from a results file

For the size's random-weight llama (bench/recipes/<size>.yaml) and the trained reference model
(bench/recipes/reference.yaml, for quality), with one workload (prompt 128, output 64, batch/concurrency 1
and 4, the recipes' `serving.workload`):
  - PyTorch eager: transformers `generate` on the source model (bench/common.py torch-eager);
  - recipec: `recipec build` of the recipe (passes whose op is not registered are dropped and reported
    "not available"), its report.json's serving runs and quality;
  - onnxruntime-genai's model builder (fp32, int4) run through og.Generator, and Optimum's ONNX export run
    by ORTModelForCausalLM, each in its own virtual environment under bench/.venvs/ (bench/peers.py);
  - the physical limit: this machine's measured memory bandwidth and the decode TPOT it allows for the
    bytes each variant reads per step (MBU = that floor / measured TPOT);
  - the pairs the targets compare (recipec against genai and eager, a split against its parts), measured
    again in alternating rounds (bench/headtohead.py).
Writes <out>/<date>-<HHMM>-<machine>-<size>.json and the size's section of docs/benchmarks.md. Peer builds
are cached under bench/.cache/peers/, recipec's stages in its own cache; --resume reuses the finished phases
of an interrupted run of the same size.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C
from headtohead import head_to_head
from render import render_section, update_docs
from rows import add_limits, add_ratios, batch_runs, make_row, phases_of, precision_of, recipec_runs, variant_ops
from targets import KL_GATE, evaluate_targets
import numpy as np
import yaml

RECIPES = C.BENCH / "recipes"
SIZES = ("small", "medium")
DOCS = C.ROOT / "docs" / "benchmarks.md"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")

# Speculative decoding, per model key: measured at batch 1 on the eval windows (recipec.profile.speculative, as
# a report's variants.<v>.speculative) by this script, so that the serving runs stay plain and every TPOT
# compared with onnxruntime-genai is like for like. Only on the trained reference model: prompt lookup needs
# text that repeats itself, not random weights. K = 3: on the 2-core EPYC host (2026-12-01), over K = 2, 3, 4
# and every identical variant, 3 gave the lowest speculative TPOT (docs/speculative.md, "Choosing K").
SPECULATE = {"reference": {"method": "ngram", "tokens": 3}}

# The peers: (id, environment, system, precision). Their build commands are in build_peer.
PEERS = [("genai-fp32", "genai", "onnxruntime-genai", "fp32"),
         ("genai-int4", "genai", "onnxruntime-genai", "int4"),
         ("optimum-fp32", "optimum", "optimum-onnx", "fp32")]


def say(msg: str) -> None:
    load = C.load_avg()
    print(f"[{time.strftime('%H:%M:%S')} load {load[0] if load else '?'}] {msg}", flush=True)


def host_was_busy(load_start: list[float] | None, models: list[dict[str, Any]], cores: int) -> bool:
    """Other work shared the CPU: the load before the run began, or during a measurement beyond what the
    measured system's own threads (at most one per core) explain."""
    if load_start and load_start[0] > 0.5 * cores:
        return True
    during = [x for m in models for row in m["rows"] for run in row.get("runs", {}).values()
              for x in (run.get("host_load_avg") or [])[:1] if x is not None]
    return any(x > cores + 0.5 for x in during)


# ---------------------------------------------------------------- phases (resumable)

class Phases:
    """Each phase's result as JSON under bench/.cache/runs/<size>/; --resume reuses the ones that finished."""

    def __init__(self, size: str, resume: bool):
        self.dir = C.CACHE / "runs" / size
        if not resume and self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.timings: dict[str, float] = {}

    def path(self, name: str, suffix: str = ".json") -> Path:
        return self.dir / f"{name}{suffix}"

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        path = self.path(name)
        if path.is_file():
            say(f"{name}: reusing the result of the interrupted run")
            return json.loads(path.read_text())
        started = time.perf_counter()
        result = fn()
        self.timings[name] = round(time.perf_counter() - started, 1)
        path.write_text(json.dumps(result, indent=1, default=_json_default))
        return result


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


# ---------------------------------------------------------------- recipes

def prepare_recipe(src: Path, threads: int) -> tuple[Path, dict[str, Any], dict[str, str]]:
    """A copy of the bench recipe without the passes whose op recipec does not register (and what depends
    on them), with every `after` explicit and serving.threads set; and the dropped variants with why."""
    from recipec.passes import PASSES

    data = yaml.safe_load(src.read_text())
    entries = data.get("passes", [])
    previous, kept, dropped = "source", [], {}
    first_parents = []
    for entry in entries:
        after = entry.get("after", previous)
        parents = [after] if isinstance(after, str) else list(after)
        first_parents.append(parents[0])
        previous = entry["id"]
        missing = next((p for p in parents if p in dropped), None)
        if entry["op"] not in PASSES:
            dropped[entry["id"]] = f"op {entry['op']!r} is not registered in recipec.passes (has: {', '.join(sorted(PASSES))})"
        elif missing:
            dropped[entry["id"]] = dropped[missing]
        else:
            kept.append({**entry, "after": after})
    leaves = {e["id"] for e in entries} - set(first_parents)
    data["passes"] = kept
    serving = data.setdefault("serving", {})
    serving["device"] = "cpu"
    if threads:
        serving["threads"] = threads
    out = C.CACHE / "recipes" / src.name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# generated by bench/run.py from bench/recipes/{src.name}; edit that file, not this one\n"
                   + yaml.safe_dump(data, sort_keys=False, width=120))
    return out, data, {v: why for v, why in dropped.items() if v in leaves}


# ---------------------------------------------------------------- recipec

def recipec_build(recipe: Path, name: str, log_dir: Path) -> dict[str, Any]:
    out_root = C.CACHE / "out"
    report_path = out_root / name / "report.json"
    started = time.time()
    log = log_dir / f"{name}-build.log"
    say(f"recipec build {recipe.relative_to(C.ROOT)} (log: {log.relative_to(C.ROOT)})")
    cmd = [sys.executable, "-m", "recipec.cli", "build", str(recipe), "--out", str(out_root)]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=C.ROOT,
                                env={**os.environ, "COLUMNS": "160"})
        for line in proc.stdout:
            f.write(line)
            if line.lstrip().startswith(("done", "running", "cached", "profiling ", "wrote", "error", "gate")):
                print(f"    {line.rstrip()}", flush=True)
    rc = proc.wait()
    if not report_path.is_file() or report_path.stat().st_mtime < started:
        tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
        raise RuntimeError(f"recipec build {recipe} wrote no report (exit {rc}):\n{tail}")
    manifest = json.loads((out_root / name / "manifest.json").read_text())
    return {"exit_code": rc, "out_dir": str(out_root / name), "report": json.loads(report_path.read_text()),
            "manifest": manifest, "seconds": round(time.time() - started, 1)}


def source_dir(manifest: dict[str, Any]) -> Path:
    from recipec.build.cache import StageCache

    key = next(s["key"] for s in manifest["stages"] if s["id"] == "source")
    entry = StageCache(warn=lambda s: None).lookup(key)
    if entry is None:
        raise RuntimeError(f"the source stage {key[:12]} is not in recipec's cache any more")
    return entry.output


# ---------------------------------------------------------------- models for the peers

def hf_dir_with_tokenizer(src: Path, key: str) -> Path:
    """The source model as a save_pretrained directory with tokenizer files (onnxruntime-genai's builder and
    Optimum need them). The reference model has its own; a random-weight model gets a word-level tokenizer
    with one token per id (t0, t1, ...), so the vocabulary matches the model's."""
    if any((src / f).is_file() for f in TOKENIZER_FILES):
        return src
    target = C.CACHE / "models" / key[:16]
    if (target / "tokenizer_config.json").is_file():
        return target
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    config = json.loads((src / "config.json").read_text())
    vocab = int(config["vocab_size"])
    specials = {config.get("bos_token_id", 1): "<s>", config.get("eos_token_id", 2): "</s>"}
    specials = {k: v for k, v in specials.items() if isinstance(k, int)}
    unk = 0 if 0 not in specials else next(i for i in range(vocab) if i not in specials)
    specials[unk] = "<unk>"
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({specials.get(i, f"t{i}"): i for i in range(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp / "tokenizer.json"))
    eos = specials.get(config.get("eos_token_id"), "</s>")
    (tmp / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": eos,
        "pad_token": eos, "model_max_length": int(config.get("max_position_embeddings", 2048))}, indent=1))
    os.replace(tmp, target)
    return target


def build_peer(peer: str, env: str, python: Path, hf: Path, key: str, log: Path) -> tuple[Path, dict[str, Any]]:
    """The peer's model directory, built once per (source model, peer) and kept in bench/.cache/peers/."""
    target = C.CACHE / "peers" / key[:16] / peer
    marker = target / "bench-build.json"
    if marker.is_file():
        return target, json.loads(marker.read_text())
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    if env == "genai":
        precision = peer.split("-")[-1]
        cmd = [python, "-m", "onnxruntime_genai.models.builder", "-i", hf, "-o", target, "-p", precision, "-e", "cpu",
               "-c", C.CACHE / "peers" / "genai-builder-cache"]
    else:
        cmd = [python.parent / "optimum-cli", "export", "onnx", "--model", hf, "--task", "text-generation-with-past",
               target]
    started = time.perf_counter()
    C.run(cmd, log_file=log, cwd=C.CACHE, timeout=3600)
    info = {"command": " ".join(str(c).replace(str(C.ROOT) + "/", "") for c in cmd),
            "seconds": round(time.perf_counter() - started, 1)}
    marker.write_text(json.dumps(info, indent=1))
    return target, info


# ---------------------------------------------------------------- one model

def bench_model(key: str, recipe_src: Path, args, phases: Phases, log_dir: Path) -> dict[str, Any]:
    from recipec.profile.quality import logit_quality

    recipe, data, unavailable = prepare_recipe(recipe_src, args.threads)
    name = data["name"]
    workload = data["serving"]["workload"]
    prompt, output = int(workload["prompt_tokens"]), int(workload["output_tokens"])
    requests, warmup = int(workload["requests"]), int(workload.get("warmup_requests", 2))
    batches = [int(c) for c in (workload["concurrency"] if isinstance(workload["concurrency"], list)
                                else [workload["concurrency"]])]
    common_args = ["--batches", ",".join(map(str, batches)), "--prompt", str(prompt), "--output", str(output),
                   "--requests", str(requests), "--warmup", str(max(1, warmup // max(batches))),
                   "--threads", str(args.threads)]

    build = phases.run(f"{key}-recipec", lambda: recipec_build(recipe, name, log_dir))
    report, manifest = build["report"], build["manifest"]
    src = source_dir(manifest)
    source_key = next(s["key"] for s in manifest["stages"] if s["id"] == "source")
    rows: list[dict[str, Any]] = []

    # eval tokens (exactly what the report's quality used) and the source's logits on them
    tokens_path = phases.path(f"{key}-eval-tokens", ".npy")
    from recipec.source.data import RecipeData

    tokens = RecipeData(manifest["recipe"]["resolved"]["data"], src, recipe.parent).eval().numpy()
    np.save(tokens_path, tokens)
    source_logits: dict[str, np.ndarray] = {}

    def quality_of(logits_path: Path) -> dict[str, Any]:
        if "x" not in source_logits:
            from recipec.profile.quality import source_reference

            source_logits["x"] = source_reference(src, tokens)["logits"]
        q = logit_quality(tokens, np.load(logits_path), source_logits["x"])
        return {k: q[k] for k in ("kl_divergence", "top1_agreement", "perplexity", "source_perplexity")}

    # PyTorch eager: the baseline
    def pytorch() -> dict[str, Any]:
        say(f"{key}: PyTorch eager generate")
        out = phases.path(f"{key}-pytorch-raw")
        C.run([sys.executable, C.BENCH / "common.py", "torch-eager", "--model-dir", src, "--out", out, *common_args],
              log_file=log_dir / f"{key}-pytorch.log", timeout=7200)
        return json.loads(out.read_text())
    eager = phases.run(f"{key}-pytorch", pytorch)
    cost = eager["cost"]
    src_q = report["variants"]["baseline"]["quality"]
    rows.append(make_row(key, "pytorch-eager", "source model", "fp32", batch_runs(eager),
                         cost["weight_bytes_per_decode_step"], C.dir_bytes(src),
                         {"kl_divergence": 0.0, "top1_agreement": 1.0, "perplexity": src_q.get("source_perplexity"),
                          "source_perplexity": src_q.get("source_perplexity")},
                         note="the reference of every ratio", threads=eager.get("threads")))

    speculation = phases.run(f"{key}-speculative", lambda: measure_speculation(
        report, tokens, SPECULATE[key], workload, args.threads)) if key in SPECULATE else {}

    # recipec's variants
    for variant, entry in report["variants"].items():
        ops = variant_ops(manifest, variant)
        q = entry["quality"]
        rows.append(make_row(key, "recipec", variant, precision_of(ops), recipec_runs(entry),
                             entry["artifact"]["weight_bytes_per_decode_step"], entry["artifact"]["bytes"],
                             {k: q.get(k) for k in ("kl_divergence", "top1_agreement", "perplexity",
                                                     "source_perplexity", "greedy_agreement")},
                             passes=" → ".join(f"{s['op']}" + (f"({s['params']['scheme']}"
                                                                 + (f", acc{s['params']['accuracy_level']}"
                                                                    if s["params"].get("accuracy_level") else "") + ")"
                                                                 if s["op"] == "quantize" else "") for s in ops),
                             pruned=any(s["op"] == "prune" for s in ops), phase_split=phases_of(manifest, ops),
                             speculative=speculation.get(variant)))
    for variant, why in unavailable.items():
        rows.append(make_row(key, "recipec", variant, "-", None, None, None, None, "not available", why))

    # the peers
    hf, peer_dirs = None, {}
    for peer, env, system, precision in PEERS:
        if args.skip_peers:
            rows.append(make_row(key, system, peer, precision, None, None, None, None, "not measured",
                                 "--skip-peers"))
            continue
        try:
            def measure(peer=peer, env=env) -> dict[str, Any]:
                nonlocal hf
                python = C.ensure_venv(env, log=say)
                hf = hf or hf_dir_with_tokenizer(src, source_key)
                say(f"{key}: {peer}: build")
                model_dir, info = build_peer(peer, env, python, hf, source_key, log_dir / f"{key}-{peer}-build.log")
                say(f"{key}: {peer}: serving runs")
                kind = "genai" if env == "genai" else "optimum"
                out = phases.path(f"{key}-{peer}-raw")
                C.run([python, C.BENCH / "peers.py", f"{kind}-bench", "--model-dir", model_dir, "--out", out,
                       *common_args], log_file=log_dir / f"{key}-{peer}.log", timeout=7200)
                result = json.loads(out.read_text())
                say(f"{key}: {peer}: logits on the eval windows")
                logits = phases.path(f"{key}-{peer}-logits", ".npy")
                C.run([python, C.BENCH / "peers.py", f"{kind}-logits", "--model-dir", model_dir, "--tokens",
                       tokens_path, "--out", logits, "--threads", str(args.threads)],
                      log_file=log_dir / f"{key}-{peer}.log", timeout=3600)
                result["quality"] = quality_of(logits)
                logits.unlink()
                onnx_file = next(model_dir.glob("*.onnx"))
                result["weights"] = C.onnx_decode_weight_bytes(onnx_file)
                result["artifact_bytes"] = C.dir_bytes(model_dir)
                result["build"], result["model_dir"], result["python"] = info, str(model_dir), str(python)
                return result
            result = phases.run(f"{key}-{peer}", measure)
            peer_dirs[peer] = (result["model_dir"], result["python"])
            rows.append(make_row(key, system, peer, precision, batch_runs(result),
                                 result["weights"]["weight_bytes_per_decode_step"], result["artifact_bytes"],
                                 result["quality"], build=result["build"], versions=result.get("versions")))
        except Exception as exc:  # noqa: BLE001 - a peer that cannot handle the model is a row that says why
            reason = C.first_error(str(exc))
            say(f"{key}: {peer}: FAILED: {reason}")
            rows.append(make_row(key, system, peer, precision, None, None, None, None, "failed", reason))

    paired = phases.run(f"{key}-headtohead", lambda: head_to_head(
        rows, peer_dirs, report, src, common_args, phases.dir,
        log_dir / f"{key}-headtohead.log", say))
    return {"model": key, "recipe": str(recipe_src.relative_to(C.ROOT)), "name": name, "head_to_head": paired,
            "config": {k: v for k, v in json.loads((src / "config.json").read_text()).items()
                       if k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                "num_key_value_heads", "vocab_size", "tie_word_embeddings")},
            "parameters": cost["parameters"], "kv_bytes_per_token": cost["kv_bytes_per_token"],
            "workload": {"prompt_tokens": prompt, "output_tokens": output, "requests": requests, "batches": batches},
            "recipec_build": {"exit_code": build["exit_code"], "seconds": build["seconds"],
                              "gates_passed": report.get("gates_passed"),
                              "stages": [{k: s[k] for k in ("id", "op", "seconds", "cached")}
                                         for s in manifest["stages"]],
                              "measured_bandwidth_gb_s": report["hardware"].get("measured_bandwidth_gb_s")},
            "rows": rows}


def measure_speculation(report: dict[str, Any], tokens: np.ndarray, spec: dict[str, Any], workload: dict[str, Any],
                        threads: int) -> dict[str, dict[str, Any]]:
    """Each variant decoded plainly and speculatively at batch 1, greedy, in this process."""
    from recipec.profile.speculative import measure_speculative
    from recipec.runtime.lm import load
    from recipec.runtime.speculative import SpecConfig

    out = {}
    for variant, entry in report["variants"].items():
        say(f"speculative decoding ({spec['method']}, K={spec['tokens']}) on {variant}, batch 1")
        variant_dir = C.variant_dir(report, variant)
        lm = load(variant_dir, device="cpu", threads=threads or None)
        out[variant] = measure_speculative(lm, variant_dir, SpecConfig(**spec), tokens, {"workload": workload})
    return out


# ---------------------------------------------------------------- main

def machine_slug(name: str, cores: int | None) -> str:
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w and w not in ("r", "tm", "cpu", "processor", "intel", "amd")]
    return "-".join(words[:3] + [f"{cores}c"]) if words else f"{platform.machine()}-{cores}c"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="small")
    parser.add_argument("--out", type=Path, default=C.BENCH / "results")
    parser.add_argument("--threads", type=int, default=0,
                        help="intra-op threads for every system (0 = each library's default: all cores)")
    parser.add_argument("--skip-peers", action="store_true", help="leave onnxruntime-genai and Optimum out")
    parser.add_argument("--models", default="main,reference", help="main (the size's model), reference, or both")
    parser.add_argument("--resume", action="store_true", help="reuse the finished phases of an interrupted run")
    parser.add_argument("--docs", type=Path, default=DOCS, help="Markdown file whose section for the size is rewritten")
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument("--render", type=Path, metavar="RESULTS_JSON",
                        help="measure nothing: rewrite the docs section from a results file")
    args = parser.parse_args(argv)
    if args.render:
        results = json.loads(args.render.read_text())
        for model in results["models"]:
            model["targets"] = evaluate_targets(model)
        args.render.write_text(json.dumps(results, indent=1, default=_json_default) + "\n")
        update_docs(results, args.docs)
        print(render_section(results))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from recipec.profile.hardware import hardware_info, last_level_cache_bytes, measure_bandwidth

    t0 = time.perf_counter()
    started_at = dt.datetime.now().astimezone()
    load_start = C.load_avg()
    phases = Phases(args.size, args.resume)
    log_dir = phases.dir / "logs"
    log_dir.mkdir(exist_ok=True)
    say(f"bench --size {args.size}; logs in {log_dir.relative_to(C.ROOT)}")
    hw = hardware_info("cpu")
    bw = [(hw["measured_bandwidth_gb_s"], hw["measured_bandwidth_method"])]
    say(f"memory bandwidth {bw[0][0]:.2f} GB/s")

    wanted = args.models.split(",")
    models = []
    if "main" in wanted:
        models.append(bench_model(args.size, RECIPES / f"{args.size}.yaml", args, phases, log_dir))
    if "reference" in wanted:
        models.append(bench_model("reference", RECIPES / "reference.yaml", args, phases, log_dir))

    bw.append(measure_bandwidth("cpu", last_level_cache_bytes()))
    bw += [(m["recipec_build"]["measured_bandwidth_gb_s"], "recipec build's hardware_info")
           for m in models if m["recipec_build"]["measured_bandwidth_gb_s"]]
    best_bw = max(bw, key=lambda x: x[0])
    llc = {"bytes": last_level_cache_bytes()}
    if llc["bytes"]:
        llc["buffer_bytes"] = min(llc["bytes"] // 8, 64 << 20)
        llc["bandwidth_gb_s"] = C.copy_bandwidth(llc["buffer_bytes"])
        say(f"last-level cache {llc['bytes'] / 2**20:.0f} MiB, copy bandwidth inside it {llc['bandwidth_gb_s']:.1f} GB/s")
    for model in models:
        add_limits(model["rows"], best_bw[0], model["kv_bytes_per_token"], model["workload"]["prompt_tokens"],
                   model["workload"]["output_tokens"], llc)
        add_ratios(model["rows"])
        model["targets"] = evaluate_targets(model)

    load_end = C.load_avg()
    cores = os.cpu_count() or 1
    results = {
        "schema": 1, "size": args.size, "threads": args.threads, "started_at": started_at.isoformat(timespec="seconds"),
        "wall_seconds": round(time.perf_counter() - t0, 1), "phase_seconds": phases.timings,
        "load_avg_start": load_start, "load_avg_end": load_end,
        "busy": host_was_busy(load_start, models, cores),
        "hardware": {k: hw.get(k) for k in ("name", "cores", "memory_gb")},
        "bandwidth_gb_s": best_bw[0],
        "bandwidth_method": f"best of {len(bw)} measurements (at start, at end, and in each recipec build): "
                            + best_bw[1],
        "bandwidth_measurements_gb_s": [round(x[0], 3) for x in bw],
        "last_level_cache": llc,
        "kl_gate": KL_GATE, "models": models,
        "definitions": {
            "ttft_ms/tpot_ms/e2e_latency_ms": "per request; p50/p10/p90/min/max over requests. TPOT = (e2e - TTFT) / "
                                              "(n_out - 1) (vLLM's definition)",
            "batch": "recipec: closed-loop concurrency with continuous batching (recipec's profiler); PyTorch, "
                     "onnxruntime-genai, Optimum: B requests sent together as one batch",
            "output_throughput_tok_s": "recipec: Σ output tokens / run duration; others: B·n_out / call time, per call",
            "tpot_floor_ms": "bytes one decode step reads (weights as stored, minus gathered embedding tables, plus "
                             "KV cache at the mean decode context) / measured bandwidth",
            "mbu": "tpot_floor_ms / TPOT p50",
            "quality": "KL(source || system) in nats per token, top-1 agreement and perplexity on the recipe's eval "
                       "windows, every position, one window at a time",
            "ratio_to_pytorch": "p50 of the system / p50 of PyTorch eager, same model and batch, this run",
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{started_at:%Y-%m-%d-%H%M}-{machine_slug(hw['name'], hw.get('cores'))}-{args.size}.json"
    path.write_text(json.dumps(results, indent=1, default=_json_default) + "\n")
    say(f"wrote {path}")
    if not args.no_docs:
        update_docs(results, args.docs)
        say(f"updated {args.docs}")
    print(render_section(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
