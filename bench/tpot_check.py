"""Cross-check recipec's TPOT against an independent plain onnxruntime loop over the same artifact.

    python bench/tpot_check.py out/quickstart [--variant baseline] [--repeats 5]

The loop below shares no code with recipec's runtime, engine or profiler: it feeds numpy arrays to
`InferenceSession.run` (no IOBinding), batch 1, greedy, the build's prompt and output lengths, and
times each decode step with perf_counter. It compares the median of its per-request TPOT with the
report's `tpot_ms.p50` at concurrency 1 and exits 1 when they differ by more than 20%.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

TOLERANCE = 0.20


def plain_tpot_ms(model_path: Path, artifact: dict, prompt_len: int, output_len: int, threads: int, seed: int) -> float:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    kv = artifact["kv_cache"]
    shape = (1, kv["num_kv_heads"], 0, kv["head_dim"])
    names = [i.name for i in session.get_inputs()]
    past = {n: np.zeros(shape, dtype=np.float16 if kv["dtype"] == "float16" else np.float32)
            for n in names if n.startswith("past_key_values.")}
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, artifact["model"]["vocab_size"], size=(1, prompt_len), dtype=np.int64)
    outputs = [o.name for o in session.get_outputs()]
    length, times = 0, []
    for step in range(output_len):
        feeds = {"input_ids": ids, "attention_mask": np.ones((1, length + ids.shape[1]), dtype=np.int64), **past}
        if "position_ids" in names:
            feeds["position_ids"] = np.arange(length, length + ids.shape[1], dtype=np.int64)[None, :]
        result = session.run(outputs, feeds)
        times.append(time.perf_counter())
        logits = result[0][:, -1, :]
        length += ids.shape[1]
        ids = logits.argmax(-1).astype(np.int64)[:, None]
        presents = dict(zip(outputs, result))
        past = {n: presents[n.replace("past_key_values.", "present.")] for n in past}
    return (times[-1] - times[0]) / (output_len - 1) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("build_dir", type=Path)
    parser.add_argument("--variant", default="baseline")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    report = json.loads((args.build_dir / "report.json").read_text())
    manifest = json.loads((args.build_dir / "manifest.json").read_text())
    serving = manifest["recipe"]["resolved"]["serving"]
    workload = serving["workload"]
    prompt_len, output_len = workload["prompt_tokens"], workload["output_tokens"]
    if not isinstance(prompt_len, int) or not isinstance(output_len, int):
        sys.exit("this check needs fixed prompt and output lengths in the workload")
    run = next(r for r in report["variants"][args.variant]["serving"] if r.get("concurrency") == 1)
    variant_dir = args.build_dir / "variants" / args.variant
    artifact = json.loads((variant_dir / "artifact.json").read_text())
    plain = [plain_tpot_ms(variant_dir / "model.onnx", artifact, prompt_len, output_len, serving["threads"], seed)
             for seed in range(args.repeats)]
    ours, theirs = run["tpot_ms"]["p50"], statistics.median(plain)
    gap = abs(ours - theirs) / theirs
    print(f"{args.variant}: recipec TPOT p50 {ours:.3f} ms ({run['batching']} batching, concurrency 1); "
          f"plain onnxruntime loop {theirs:.3f} ms (median of {args.repeats}, spread "
          f"{min(plain):.3f}-{max(plain):.3f}); difference {gap:.1%} (tolerance {TOLERANCE:.0%})")
    return 0 if gap <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
