"""The peers, measured inside their own virtual environments (bench/.venvs/<name>, made by bench/run.py):

    python bench/peers.py genai-bench   --model-dir OG_DIR  --out FILE [--batches 1,4 --prompt 128 --output 64 --requests 8]
    python bench/peers.py genai-logits  --model-dir OG_DIR  --tokens EVAL.npy --out LOGITS.npy
    python bench/peers.py optimum-bench  --model-dir OPT_DIR --out FILE [...]
    python bench/peers.py optimum-logits --model-dir OPT_DIR --tokens EVAL.npy --out LOGITS.npy

genai: a directory written by onnxruntime-genai's model builder, run through og.Generator (the runtime it
is built for: its graphs share one KV buffer of max_length). optimum: a directory written by
`optimum-cli export onnx --task text-generation-with-past`, run by ORTModelForCausalLM.generate.
Both go through bench/common.py's measure_batches, the loop PyTorch eager is measured with.
Logits: every position of each eval window alone (no padding), written as float32 [N, T, V]; the
caller computes KL and perplexity against the source model, as recipec's profiler does for its variants.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_avg, measure_batches


def _log(s: str) -> None:
    print(f"[peer] {s}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- onnxruntime-genai

def _genai_model(model_dir: str, threads: int):
    import onnxruntime_genai as og

    # the same intra-op thread count the other systems get (genai_config's session_options; 0 = default)
    path = Path(model_dir) / "genai_config.json"
    data = json.loads(path.read_text())
    options = data["model"]["decoder"].setdefault("session_options", {})
    if options.get("intra_op_num_threads", 0) != threads:
        if threads:
            options["intra_op_num_threads"] = threads
        else:
            options.pop("intra_op_num_threads", None)
        path.write_text(json.dumps(data, indent=4))
    return og.Model(og.Config(model_dir))


def genai_bench(args) -> dict:
    import onnxruntime_genai as og

    t0 = time.perf_counter()
    model = _genai_model(args.model_dir, args.threads)
    load_s = time.perf_counter() - t0
    vocab = json.loads((Path(args.model_dir) / "genai_config.json").read_text())["model"]["vocab_size"]
    total = args.prompt + args.output

    def generate(prompts: np.ndarray):
        params = og.GeneratorParams(model)
        # min_length = max_length: exactly `output` new tokens, eos ignored (like the other systems)
        params.set_search_options(max_length=total, min_length=total, do_sample=False, batch_size=prompts.shape[0])
        gen = og.Generator(model, params)
        times: list[list[float]] = [[] for _ in range(prompts.shape[0])]
        start = time.perf_counter()
        gen.append_tokens(prompts.astype(np.int32))  # runs the prompt
        while not gen.is_done():
            gen.generate_next_token()  # picks a token from the last logits (then runs it on the next call)
            now = time.perf_counter()
            for row in times:
                row.append(now)
        del gen
        return start, times

    runs = measure_batches(generate, vocab, args.batch_list, args.prompt, args.output, args.requests, args.warmup,
                           args.seed, log=_log)
    return {"system": "onnxruntime-genai", "load_seconds": load_s, "runs": runs,
            "method": "og.Generator: append_tokens(prompt) then generate_next_token until max_length, min_length = "
                      "max_length; a token's time is when generate_next_token returned it; batch B = one "
                      "generator of B equal-length prompts"}


def genai_logits(args) -> None:
    """The builder's graph run by onnxruntime directly, prompt-only (empty past), all positions."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(Path(args.model_dir) / "model.onnx"), providers=["CPUExecutionProvider"])
    head_size = json.loads((Path(args.model_dir) / "genai_config.json").read_text())["model"]["decoder"]["head_size"]
    _write_logits(args, lambda ids: session.run(["logits"], _genai_feeds(session, ids, head_size))[0])


def _genai_feeds(session, ids: np.ndarray, head_size: int) -> dict:
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for inp in session.get_inputs():
        if inp.name.startswith("past_key_values"):
            shape = [ids.shape[0], inp.shape[1], 0, head_size]
            feeds[inp.name] = np.zeros(shape, dtype=np.float16 if "float16" in inp.type else np.float32)
        elif inp.name == "position_ids":
            feeds[inp.name] = np.arange(ids.shape[1], dtype=np.int64)[None].repeat(ids.shape[0], 0)
    return feeds


# ---------------------------------------------------------------- optimum

def _optimum_model(model_dir: str, threads: int):
    import onnxruntime as ort
    from optimum.onnxruntime import ORTModelForCausalLM

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ORTModelForCausalLM.from_pretrained(model_dir, use_cache=True, session_options=options,
                                               provider="CPUExecutionProvider")


def optimum_bench(args) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import TokenTimes

    t0 = time.perf_counter()
    model = _optimum_model(args.model_dir, args.threads)
    load_s = time.perf_counter() - t0
    vocab = model.config.vocab_size
    eos = model.generation_config.eos_token_id
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else ((eos[0] if isinstance(eos, list) else eos) if eos is not None else 0)

    def generate(prompts: np.ndarray):
        ids = torch.as_tensor(prompts)
        streamer = TokenTimes(ids.shape[0])
        start = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.output,
                       min_new_tokens=args.output, do_sample=False, streamer=streamer, pad_token_id=pad)
        return start, streamer.times

    runs = measure_batches(generate, vocab, args.batch_list, args.prompt, args.output, args.requests, args.warmup,
                           args.seed, log=_log)
    return {"system": "optimum-onnx", "load_seconds": load_s, "runs": runs,
            "method": "ORTModelForCausalLM.generate (greedy, min_new_tokens = max_new_tokens), timed by the same "
                      "streamer as PyTorch eager; batch B = B requests sent together"}


def optimum_logits(args) -> None:
    import torch

    model = _optimum_model(args.model_dir, args.threads)

    def logits(ids: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            t = torch.as_tensor(ids)
            return model(input_ids=t, attention_mask=torch.ones_like(t)).logits.float().numpy()
    _write_logits(args, logits)


# ---------------------------------------------------------------- shared

def _write_logits(args, run) -> None:
    tokens = np.load(args.tokens).astype(np.int64)
    np.save(args.out, np.stack([np.asarray(run(row[None]), dtype=np.float32)[0] for row in tokens]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/peers.py")
    parser.add_argument("command", choices=["genai-bench", "genai-logits", "optimum-bench", "optimum-logits"])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokens")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--output", type=int, default=64)
    parser.add_argument("--requests", type=int, default=8, help="request samples per batch size")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    args.batch_list = [int(b) for b in args.batches.split(",")]
    if args.command.endswith("-logits"):
        {"genai-logits": genai_logits, "optimum-logits": optimum_logits}[args.command](args)
        return 0
    result = {"genai-bench": genai_bench, "optimum-bench": optimum_bench}[args.command](args)
    result.update(prompt_tokens=args.prompt, output_tokens=args.output, threads=args.threads or None,
                  host_load_avg_end=load_avg(), versions=_versions())
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


def _versions() -> dict:
    from importlib import metadata

    out = {}
    for dist in ("onnxruntime", "onnxruntime-genai", "optimum", "optimum-onnx", "transformers", "torch"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


if __name__ == "__main__":
    sys.exit(main())
