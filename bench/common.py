"""What bench/run.py, bench/peers.py (inside the peers' virtual environments) and bench/gpu_check.sh share.

Only the standard library and numpy are imported at module level: the peers' environments have neither
recipec nor the main environment's transformers, so everything else is imported where it is used.

    python bench/common.py torch-eager --model-dir DIR | --config-json '{...}' [--device cpu|cuda]
        [--dtype float32|float16|bfloat16] [--batches 1,4] [--prompt 128] [--output 64] [--requests 8] --out FILE

measures PyTorch eager `generate` (the baseline a user starts from) and writes JSON: per batch size, the
TTFT, TPOT and end-to-end samples of every request, tokens/s of every repetition, and the peak memory.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
VENVS = BENCH / ".venvs"
CACHE = BENCH / ".cache"

# The peers, each in its own virtual environment (bench/.venvs/<name>). torch==2.13.0 first: that is the
# CPU wheel this machine keeps on disk; a range admitting a newer torch pulls a multi-GB CUDA build.
PEER_ENVS: dict[str, dict[str, Any]] = {
    "genai": {"requirements": ["torch==2.13.0", "onnxruntime-genai==0.18.0", "transformers==5.24.0", "onnx-ir",
                               "onnx", "numpy"],
              "probe": "import onnxruntime_genai, onnx_ir, transformers, torch"},
    # optimum-onnx 0.1.0 pins transformers < 4.58, so it cannot share the main environment (transformers 5)
    "optimum": {"requirements": ["torch==2.13.0", "optimum-onnx[onnxruntime]==0.1.0"],
                "probe": "import optimum.onnxruntime, transformers, torch"},
}


# ---------------------------------------------------------------- small things

def load_avg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def summarize(values: Iterable[float]) -> dict[str, float] | None:
    """Median and spread of repeated measurements: p50, p10, p90, min, max, mean, n."""
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if arr.size == 0:
        return None
    p10, p50, p90 = np.percentile(arr, [10, 50, 90])
    return {"p50": float(p50), "p10": float(p10), "p90": float(p90), "min": float(arr.min()),
            "max": float(arr.max()), "mean": float(arr.mean()), "n": int(arr.size)}


def random_prompts(vocab_size: int, batch: int, length: int, seed: int) -> np.ndarray:
    """Seeded random token ids [batch, length], avoiding the first ids (special tokens in most vocabularies)."""
    low = min(4, vocab_size - 1)
    return np.random.default_rng(seed).integers(low, vocab_size, size=(batch, length), dtype=np.int64)


def request_samples(start: float, token_times: Sequence[Sequence[float]]) -> dict[str, list[float]]:
    """Per request of a batch that started at `start`: TTFT, TPOT = (e2e - TTFT) / (n - 1), e2e, in ms."""
    out: dict[str, list[float]] = {"ttft_ms": [], "tpot_ms": [], "e2e_latency_ms": []}
    for times in token_times:
        if not times:
            continue
        ttft, e2e = (times[0] - start) * 1e3, (times[-1] - start) * 1e3
        out["ttft_ms"].append(ttft)
        out["e2e_latency_ms"].append(e2e)
        if len(times) > 1:
            out["tpot_ms"].append((e2e - ttft) / (len(times) - 1))
    return out


def merge_samples(into: dict[str, list[float]], more: dict[str, list[float]]) -> None:
    for key, values in more.items():
        into.setdefault(key, []).extend(values)


# ---------------------------------------------------------------- peak memory

class PeakRSS:
    """Peak resident set of this process over a `with` block: the kernel's VmHWM, reset on entry by writing
    5 to /proc/self/clear_refs (the method recipec's profiler uses); where that is refused, the
    process-lifetime peak (ru_maxrss), which the `source` string then says."""

    def __enter__(self):
        self.reset = _reset_hwm()
        return self

    def __exit__(self, *exc):
        hwm = _vm_hwm_mb()
        if self.reset and hwm is not None:
            self.peak_mb, self.source = hwm, "VmHWM after reset (/proc/self/clear_refs)"
        else:
            import resource

            self.peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
            self.source = "ru_maxrss (process lifetime peak; VmHWM reset refused)"
        return False


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _vm_hwm_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


# ---------------------------------------------------------------- a measured batch loop

def measure_batches(generate: Callable[[np.ndarray], tuple[float, list[list[float]]]], vocab_size: int,
                    batches: Sequence[int], prompt_len: int, output_len: int, requests: int, warmup: int = 1,
                    seed: int = 0, peak: Callable[[], Any] = PeakRSS,
                    log: Callable[[str], None] = lambda s: None) -> list[dict[str, Any]]:
    """The one loop every system outside recipec is measured with: for each batch size B, `warmup` uncounted
    calls, then ceil(requests / B) calls of `generate(prompts [B, P]) -> (start time, per-row token
    timestamps)`, each with fresh seeded prompts, so every batch size yields about `requests` request samples
    (recipec's profiler sends `requests` requests at each concurrency). Tokens/s per call is
    B * output_len / (last token - start)."""
    runs = []
    for batch in batches:
        reps = max(1, -(-requests // batch))
        log(f"batch {batch}: {warmup} warm-up + {reps} measured calls")
        for i in range(warmup):
            generate(random_prompts(vocab_size, batch, prompt_len, seed + 10_000 + i))
        samples: dict[str, list[float]] = {}
        tok_s, n_out = [], []
        with peak() as mem:
            for rep in range(reps):
                start, times = generate(random_prompts(vocab_size, batch, prompt_len, seed + rep))
                merge_samples(samples, request_samples(start, times))
                last = max(t[-1] for t in times if t)
                tok_s.append(sum(len(t) for t in times) / (last - start))
                n_out.extend(len(t) for t in times)
        if any(n != output_len for n in n_out):
            log(f"warning: asked for {output_len} tokens, got {sorted(set(n_out))}")
        runs.append({"batch": batch, "samples": {**samples, "output_throughput_tok_s": tok_s},
                     "output_tokens": sorted(set(n_out)), "peak_memory_mb": getattr(mem, "peak_mb", None),
                     "peak_memory_source": getattr(mem, "source", None), "host_load_avg": load_avg()})
    return runs


# ---------------------------------------------------------------- PyTorch eager

class TokenTimes:
    """A transformers streamer that only timestamps: `generate` puts the prompt first, then each step's
    new tokens ([B], already copied to the host, so on CUDA the time is when the token is really there)."""

    def __init__(self, batch: int):
        self.times: list[list[float]] = [[] for _ in range(batch)]
        self._prompt_seen = False

    def put(self, value) -> None:
        now = time.perf_counter()
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for row in self.times:
            row.append(now)

    def end(self) -> None:
        pass


def load_torch_model(model_dir: str | None, config: dict | None, device: str, dtype: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype)
    if model_dir:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)
    else:
        config = dict(config)
        family = config.pop("model_type", "llama")
        torch.manual_seed(config.pop("seed", 0))
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **config), dtype=torch_dtype)
    return model.to(device).eval()


def torch_cost(model, dtype_bytes: int) -> dict[str, Any]:
    """Bytes one decode step reads: every weight but an untied input embedding (a decode step gathers one row
    of it), and the KV cache per token (2 x layers x kv heads x head_dim x bytes)."""
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    tied = any(p is emb for p in model.get_output_embeddings().parameters())
    gathered = 0 if tied else emb.numel()
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    return {"parameters": int(params), "active_parameters": int(params - gathered),
            "weight_bytes_per_decode_step": int((params - gathered) * dtype_bytes),
            "kv_bytes_per_token": int(2 * cfg.num_hidden_layers * kv_heads * head_dim * dtype_bytes),
            "num_layers": cfg.num_hidden_layers, "num_heads": heads, "num_kv_heads": kv_heads, "head_dim": head_dim,
            "vocab_size": cfg.vocab_size}


def torch_eager(model_dir: str | None = None, config: dict | None = None, device: str = "cpu",
                dtype: str = "float32", batches: Sequence[int] = (1, 4), prompt_len: int = 128, output_len: int = 64,
                requests: int = 8, warmup: int = 1, seed: int = 0, threads: int = 0,
                log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """transformers `generate` (greedy, exactly output_len new tokens), timed per token by TokenTimes."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = load_torch_model(model_dir, config, device, dtype)
    load_s = time.perf_counter() - t0
    cost = torch_cost(model, torch.tensor([], dtype=getattr(torch, dtype)).element_size())
    pad = model.generation_config.pad_token_id
    if pad is None:
        eos = model.generation_config.eos_token_id
        pad = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0

    @torch.no_grad()
    def generate(prompts: np.ndarray):
        ids = torch.as_tensor(prompts, device=device)
        streamer = TokenTimes(ids.shape[0])
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len,
                       min_new_tokens=output_len, do_sample=False, streamer=streamer, pad_token_id=pad)
        return start, streamer.times

    peak = PeakRSS if device != "cuda" else _CudaPeak
    runs = measure_batches(generate, cost["vocab_size"], batches, prompt_len, output_len, requests, warmup, seed,
                           peak, log)
    return {"system": "pytorch-eager", "device": device, "dtype": dtype, "threads": torch.get_num_threads(),
            "load_seconds": load_s, "cost": cost, "prompt_tokens": prompt_len, "output_tokens": output_len,
            "versions": _versions("torch", "transformers"),
            "method": "transformers generate (greedy, min_new_tokens = max_new_tokens), a streamer timestamps "
                      "each step's tokens; batch B = B requests sent together", "runs": runs}


class _CudaPeak:
    """torch's allocator peak on CUDA (what eager allocates; onnxruntime's arena is not torch's)."""

    def __enter__(self):
        import torch

        torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        import torch

        self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        self.source = "torch.cuda.max_memory_allocated"
        return False


def _versions(*dists: str) -> dict[str, str | None]:
    from importlib import metadata

    out = {}
    for dist in dists:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


# ---------------------------------------------------------------- bytes a decode step reads, MBU

def decode_step_bytes(weight_bytes: int, kv_bytes_per_token: int, batch: int, prompt_len: int, output_len: int) -> float:
    """Weights once per step plus every row's KV cache at the mean context over the decode steps."""
    mean_ctx = prompt_len + output_len / 2.0
    return weight_bytes + batch * mean_ctx * kv_bytes_per_token


def mbu(step_bytes: float, tpot_ms: float | None, bandwidth_gb_s: float | None) -> float | None:
    if not tpot_ms or not bandwidth_gb_s:
        return None
    return step_bytes / (tpot_ms / 1e3) / (bandwidth_gb_s * 1e9)


def copy_bandwidth(nbytes: int, budget_s: float = 1.0) -> float:
    """GB/s of copying an nbytes float32 buffer (read + write bytes, STREAM's convention), best of repeats
    within budget_s: with nbytes well inside the last-level cache this is the cache's bandwidth."""
    try:
        import torch

        src = torch.ones(nbytes // 4, dtype=torch.float32)
        dst = torch.empty_like(src)
        copy = lambda: dst.copy_(src)
    except ImportError:
        src = np.ones(nbytes // 4, dtype=np.float32)
        dst = np.empty_like(src)
        copy = lambda: np.copyto(dst, src)
    copy()
    best, reps, end = 0.0, 0, time.perf_counter() + budget_s
    while reps < 5 or time.perf_counter() < end:
        t = time.perf_counter()
        copy()
        best = max(best, 2.0 * nbytes / (time.perf_counter() - t))
        reps += 1
    return best / 1e9


def onnx_decode_weight_bytes(model_path: str | Path) -> dict[str, Any]:
    """Initializer bytes of an ONNX graph as stored (int4 packed; scales and zero points counted), minus the
    tables only Gather-type ops read (an embedding: a decode step reads one row). Reads no weight data."""
    import onnx
    from onnx import helper

    proto = onnx.load(str(model_path), load_external_data=False)
    consumers: dict[str, set[str]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    total = gathered = 0
    by_dtype: dict[str, int] = {}
    for init in proto.graph.initializer:
        dtype = helper.tensor_dtype_to_np_dtype(init.data_type)
        elements = int(np.prod(init.dims)) if len(init.dims) else 1
        bits = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}.get(init.data_type, np.dtype(dtype).itemsize * 8)
        size = (elements * bits + 7) // 8
        total += size
        name = onnx.TensorProto.DataType.Name(init.data_type).lower()
        by_dtype[name] = by_dtype.get(name, 0) + size
        ops = consumers.get(init.name, set())
        if ops and all(op.startswith("Gather") for op in ops) and elements > 1 << 16:
            gathered += size
    return {"bytes": total, "embedding_bytes": gathered, "weight_bytes_per_decode_step": total - gathered,
            "bytes_by_dtype": by_dtype}


def dir_bytes(path: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# ---------------------------------------------------------------- the peers' virtual environments

def venv_python(name: str) -> Path:
    return VENVS / name / "bin" / "python"


def first_error(text: str) -> str:
    """The line of a failed command's output that says what went wrong (the last error-like line)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.search(r"(Error|Exception|error:|not supported|Unsupported)", ln)]
    return (errors[-1] if errors else lines[-1] if lines else text)[:300]


def variant_dir(report: dict[str, Any], variant: str) -> Path:
    """A variant of a bench build (recipec build --out bench/.cache/out), from its report."""
    return CACHE / "out" / report["recipe"]["name"] / report["variants"][variant]["artifact"]["path"]


def ensure_venv(name: str, log: Callable[[str], None] = print) -> Path:
    """bench/.venvs/<name> with PEER_ENVS[name]'s requirements, created and installed when missing or when the
    requirements changed; returns its python. Raises RuntimeError (with pip's last lines) when it cannot."""
    spec = PEER_ENVS[name]
    venv, marker = VENVS / name, VENVS / name / ".bench-requirements.json"
    python = venv_python(name)
    wanted = json.dumps(spec["requirements"])
    if marker.is_file() and marker.read_text() == wanted and _probe(python, spec["probe"]):
        return python
    log(f"installing {name} peer environment in {venv} ({' '.join(spec['requirements'])})")
    VENVS.mkdir(parents=True, exist_ok=True)
    if not python.exists():
        run([sys.executable, "-m", "venv", str(venv)], log_file=VENVS / f"{name}.log")
    run([str(python), "-m", "pip", "install", "-q", *spec["requirements"]], log_file=VENVS / f"{name}.log")
    if not _probe(python, spec["probe"]):
        raise RuntimeError(f"{name}: installed, but `{spec['probe']}` fails in {venv}")
    marker.write_text(wanted)
    return python


def _probe(python: Path, code: str) -> bool:
    if not python.exists():
        return False
    return subprocess.run([str(python), "-c", code], capture_output=True, check=False).returncode == 0


def run(cmd: Sequence[str], log_file: Path | None = None, timeout: float | None = None, env: dict | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a command, appending its output to log_file; raise RuntimeError with the output's tail on failure."""
    started = time.perf_counter()
    proc = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd,
                          check=False)
    text = proc.stdout + proc.stderr
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "a") as f:
            f.write(f"$ {' '.join(map(str, cmd))}\n{text}\n[exit {proc.returncode} after "
                    f"{time.perf_counter() - started:.1f} s]\n")
    if proc.returncode != 0:
        tail = "\n".join(line for line in text.splitlines() if not line.startswith("WARNING: Location"))[-3000:]
        raise RuntimeError(f"`{' '.join(map(str, cmd[:4]))} ...` failed (exit {proc.returncode}):\n{tail}")
    return proc


# ---------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/common.py")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("torch-eager", help="measure transformers generate (PyTorch eager)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model-dir")
    src.add_argument("--config-json", help="a synthetic model: {model_type, seed, ...config overrides}")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--batches", default="1,4")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--output", type=int, default=64)
    p.add_argument("--requests", type=int, default=8, help="request samples per batch size")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    log = lambda s: print(f"[torch-eager] {s}", file=sys.stderr, flush=True)
    result = torch_eager(args.model_dir, json.loads(args.config_json) if args.config_json else None, args.device,
                         args.dtype, [int(b) for b in args.batches.split(",")], args.prompt, args.output, args.requests,
                         args.warmup, args.seed, args.threads, log)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
