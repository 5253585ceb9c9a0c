"""recipec at the sizes users bring: a Qwen2.5-0.5B-shaped and a Llama-3.2-1B-shaped model (bench/shapes.py,
real widths, depths and vocabularies, tied embeddings, seeded random weights saved with save_pretrained),
each built through fuse -> int8 | int4 with profiling, from an empty stage cache.

    python bench/scale.py [--models qwen2.5-0.5b,llama-3.2-1b] [--out bench/results] [--docs docs/benchmarks.md]
    python bench/scale.py --render bench/results/<file>.json
    python bench/scale.py --models qwen2.5-0.5b --resume    # reuse a finished build, measure the rest again

Per model it reports: the build's wall time and peak RSS (`/usr/bin/time -v` around `recipec build`, which
counts the profiler's serving processes too), each stage's wall time and peak RSS (manifest.json
`stages[].peak_rss_mb`) and that peak as a multiple of the fp32 weight bytes, the artifact sizes against the
fp32 checkpoint, each variant's TTFT/TPOT at batch 1 against PyTorch eager measured in the same run
(transformers `generate`, bench/common.py), KL against the source, and the largest model that built.
Writes <out>/<date>-<machine>-scale.json and the "scale" section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402
import numpy as np  # noqa: E402
from run import machine_slug  # noqa: E402
from shapes import REAL_CONFIGS, make_model  # noqa: E402

MODELS = ("qwen2.5-0.5b", "llama-3.2-1b")
WORK = C.CACHE / "scale"
DOCS = C.ROOT / "docs" / "benchmarks.md"
PROMPT, OUTPUT, REQUESTS = 128, 16, 4
RECIPE = """\
recipe: 1
name: {name}
model: {{source: path, path: {path}}}
data:
  calibration: {{samples: 4, seq_len: 128}}
  eval: {{samples: 4, seq_len: 128}}
passes:
  - {{id: fused, op: fuse}}
  # random weights have near-tied logits: top-1 agreement means little there. The KL bounds were measured on
  # a trained model; int4 with a quantized tied head over Llama-3.2-1B's 128,256-token vocabulary measured
  # KL 0.21 on random weights, so the scale bench bounds int4 at 0.5 and reports the KL it measures.
  - {{id: int8, op: quantize, with: {{scheme: int8-dynamic, min_top1: 0}}}}
  - {{id: int4, op: quantize, after: fused, with: {{scheme: int4, min_top1: 0, max_kl: 0.5}}}}
serving:
  batching: {{policy: continuous, max_batch_size: 1}}
  workload: {{prompt_tokens: {prompt}, output_tokens: {output}, requests: {requests}, warmup_requests: 1, concurrency: [1]}}
"""


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def timed(cmd: list[str], log: Path) -> dict[str, Any]:
    """Run under /usr/bin/time -v; its wall time, peak RSS and exit code (the log keeps the output)."""
    with open(log, "w") as out:
        code = subprocess.run(["/usr/bin/time", "-v", *cmd], stdout=out, stderr=subprocess.STDOUT).returncode
    return read_timed(log, code)


def read_timed(log: Path, code: int) -> dict[str, Any]:
    text = log.read_text()
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    return {"returncode": code, "peak_rss_mb": int(rss.group(1)) / 1024 if rss else None,
            "wall_s": _seconds(wall.group(1)) if wall else None, "log": str(log.relative_to(C.ROOT))}


def _seconds(clock: str) -> float:
    total = 0.0
    for part in clock.split(":"):
        total = total * 60 + float(part)
    return total


def prepare(name: str) -> tuple[Path, int, int]:
    """The model directory (made once), its fp32 weight bytes and transformers' parameter count."""
    model_dir = WORK / name / "model"
    if not (model_dir / "config.json").is_file():
        say(f"{name}: writing seeded random weights")
        shutil.rmtree(model_dir, ignore_errors=True)
        make_model(name, model_dir)
    weights = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    from transformers import AutoConfig, AutoModelForCausalLM
    import torch

    with torch.device("meta"):
        parameters = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir)).num_parameters()
    return model_dir, weights, parameters


def bench_model(name: str, resume: bool = False) -> dict[str, Any]:
    work = WORK / name
    model_dir, weight_bytes, parameters = prepare(name)
    recipe = work / "recipe.yaml"
    slug = name.replace(".", "-")
    recipe.write_text(RECIPE.format(name=slug, path=model_dir, prompt=PROMPT, output=OUTPUT, requests=REQUESTS))
    if resume and (work / "out" / slug / "manifest.json").is_file() and (work / "build.log").is_file():
        say(f"{name}: reusing the finished build measured in {work / 'build.log'}")
        build = read_timed(work / "build.log", 0)
    elif resume and (work / "cache").is_dir():
        say(f"{name}: recipec build, reusing the stages an interrupted run left in the cache")
        build = timed([sys.executable, "-m", "recipec.cli", "build", str(recipe), "--out", str(work / "out"),
                       "--cache-dir", str(work / "cache")], work / "build.log")
        build["resumed_from_cache"] = True
    else:
        for stale in ("cache", "out"):
            shutil.rmtree(work / stale, ignore_errors=True)
        say(f"{name}: recipec build (every stage from an empty cache)")
        build = timed([sys.executable, "-m", "recipec.cli", "build", str(recipe), "--out", str(work / "out"),
                       "--cache-dir", str(work / "cache")], work / "build.log")
    result: dict[str, Any] = {"model": name, "config": REAL_CONFIGS[name], "fp32_weight_bytes": weight_bytes,
                              "parameters": parameters, "build": build}
    out = work / "out" / slug
    if (out / "manifest.json").is_file():
        manifest = json.loads((out / "manifest.json").read_text())
        result["stages"] = [{"id": s["id"], "op": s["op"], "seconds": s["seconds"],
                             "peak_rss_mb": s.get("peak_rss_mb"),
                             "peak_over_fp32_weights": (s["peak_rss_mb"] * 2**20 / weight_bytes
                                                        if s.get("peak_rss_mb") else None)}
                            for s in manifest["stages"]]
    if (out / "report.json").is_file():
        result["variants"] = variant_rows(json.loads((out / "report.json").read_text()), weight_bytes)
    say(f"{name}: PyTorch eager generate")
    eager_json = work / "eager.json"
    eager = timed([sys.executable, str(C.BENCH / "common.py"), "torch-eager", "--model-dir", str(model_dir),
                   "--batches", "1", "--prompt", str(PROMPT), "--output", str(OUTPUT), "--requests", str(REQUESTS),
                   "--out", str(eager_json)], work / "eager.log")
    if eager_json.is_file():
        samples = next(r for r in json.loads(eager_json.read_text())["runs"] if r["batch"] == 1)["samples"]
        eager.update(ttft_ms=float(np.percentile(samples["ttft_ms"], 50)),
                     tpot_ms=float(np.percentile(samples["tpot_ms"], 50)))
    result["pytorch_eager"] = eager
    for row in result.get("variants", []):
        if eager.get("ttft_ms") and row.get("ttft_ms"):
            row["ttft_ratio_to_eager"] = row["ttft_ms"] / eager["ttft_ms"]
            row["tpot_ratio_to_eager"] = row["tpot_ms"] / eager["tpot_ms"]
    return result


def variant_rows(report: dict[str, Any], weight_bytes: int) -> list[dict[str, Any]]:
    rows = []
    for variant, entry in report["variants"].items():
        run = next((r for r in entry.get("serving") or [] if r.get("concurrency") == 1), None) or {}
        rows.append({"variant": variant, "bytes": entry["artifact"]["bytes"],
                     "size_over_fp32_checkpoint": entry["artifact"]["bytes"] / weight_bytes,
                     "parameters": entry["artifact"]["parameters"],
                     "ttft_ms": (run.get("ttft_ms") or {}).get("p50"), "tpot_ms": (run.get("tpot_ms") or {}).get("p50"),
                     "serving_peak_mb": run.get("peak_memory_mb"),
                     "kl_divergence": (entry.get("quality") or {}).get("kl_divergence")})
    return rows


def render(results: dict[str, Any]) -> str:
    lines = [f"Measured {results['started_at']} (last run) on {results['machine']} ({results['cores']} cores, "
             f"{results['memory_gib']:.0f} GiB) with `python bench/scale.py`: every stage built from an empty "
             f"cache; prompt {PROMPT}, output {OUTPUT}, {REQUESTS} requests at batch 1. Weights are seeded random "
             "(KL is the quality measure; top-1 means little on near-tied logits)."]
    for m in results["models"]:
        b = m["build"]
        lines += ["", f"### {m['model']}: {m['parameters'] / 1e6:,.0f}M parameters, fp32 weights "
                      f"{m['fp32_weight_bytes'] / 2**30:.2f} GiB",
                  "", f"`recipec build`: exit {b['returncode']}, {b['wall_s'] or 0:.0f} s wall, peak RSS "
                      f"{(b['peak_rss_mb'] or 0) / 1024:.2f} GiB = "
                      f"{(b['peak_rss_mb'] or 0) * 2**20 / m['fp32_weight_bytes']:.2f}x the fp32 weights "
                      "(/usr/bin/time -v, build and profiling processes)."
                      + (" This run resumed from the cache an interrupted run of the recipe left: its wall time and "
                         "peak cover the stages it ran; each stage's peak below is from the run that built it."
                         if b.get("resumed_from_cache") else "")]
        if m.get("stages"):
            lines += ["", "| stage | op | seconds | peak RSS GiB | x fp32 weights |", "| --- | --- | ---: | ---: | ---: |"]
            for s in m["stages"]:
                peak, ratio = s["peak_rss_mb"], s["peak_over_fp32_weights"]
                lines.append(f"| {s['id']} | {s['op']} | {s['seconds']:.1f} | {_n(peak and peak / 1024, 2)} | "
                             f"{_n(ratio, 2)} |")
        if m.get("variants"):
            e = m["pytorch_eager"]
            lines += ["", "| variant | size MiB | x fp32 checkpoint | parameters | TTFT ms | TPOT ms | vs eager TTFT / TPOT | KL |",
                      "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
                      f"| PyTorch eager | | | | {_n(e.get('ttft_ms'))} | {_n(e.get('tpot_ms'))} | 1 / 1 | |"]
            for v in m["variants"]:
                ratio = (f"{v['ttft_ratio_to_eager']:.2f} / {v['tpot_ratio_to_eager']:.2f}"
                         if v.get("ttft_ratio_to_eager") else "")
                lines.append(f"| {v['variant']} | {v['bytes'] / 2**20:,.0f} | {v['size_over_fp32_checkpoint']:.3f} | "
                             f"{v['parameters']:,} | {_n(v['ttft_ms'])} | {_n(v['tpot_ms'])} | {ratio} | "
                             f"{_n(v['kl_divergence'], 4)} |")
    built = [m for m in results["models"] if m["build"]["returncode"] == 0]
    largest = max(built, key=lambda m: m["parameters"]) if built else None
    lines += ["", f"Largest model that built here: {largest['model']} ({largest['parameters'] / 1e6:,.0f}M parameters)."
              if largest else "No model built."]
    return "\n".join(lines)


def _n(value: float | None, digits: int = 1) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def update_docs(section: str, docs: Path) -> None:
    begin, end = "<!-- bench:scale:begin -->", "<!-- bench:scale:end -->"
    text = docs.read_text()
    block = f"{begin}\n{section}\n{end}"
    if begin in text:
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + f"\n\n## Results: scale (0.5B and 1.2B models)\n\n{block}\n"
    docs.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/scale.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--out", type=Path, default=C.BENCH / "results")
    parser.add_argument("--docs", type=Path, default=DOCS)
    parser.add_argument("--render", type=Path, help="rewrite the docs section from a results file")
    parser.add_argument("--resume", action="store_true", help="reuse a model's finished build (and its measured log)")
    args = parser.parse_args(argv)
    if args.render:
        update_docs(render(json.loads(args.render.read_text())), args.docs)
        return 0
    import psutil

    from recipec.profile.hardware import cpu_name

    started = dt.datetime.now()
    results = {"schema": 1, "started_at": started.isoformat(timespec="minutes"), "machine": cpu_name(),
               "cores": psutil.cpu_count(), "memory_gib": psutil.virtual_memory().total / 2**30, "models": []}
    for name in args.models.split(","):
        results["models"].append(bench_model(name, args.resume))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{started:%Y-%m-%d}-{machine_slug(results['machine'], results['cores'])}-scale.json"
    if path.is_file():  # a model measured earlier the same day (one --models run each) stays beside this run's
        ran = {m["model"] for m in results["models"]}
        earlier = [m for m in json.loads(path.read_text())["models"] if m["model"] not in ran]
        results["models"] = sorted(earlier + results["models"], key=lambda m: m["parameters"])
    path.write_text(json.dumps(results, indent=1) + "\n")
    update_docs(render(results), args.docs)
    say(f"wrote {path} and {args.docs}")
    return 0 if all(m["build"]["returncode"] == 0 for m in results["models"]) else 1


if __name__ == "__main__":
    sys.exit(main())
