"""recipec against onnxruntime-genai at batch 1, interleaved: the same loop for both, alternating rounds.

    python bench/headtohead.py recipec --variant-dir DIR --out FILE [--prompt 128 --output 64 --requests 8]

bench/run.py measures every recipec variant inside `recipec build`, and each peer minutes later. On a shared
host whose speed drifts by tens of percent within minutes (docs/benchmarks.md), two such numbers compare
the host's moments as much as the systems. This module measures one recipec variant and one genai model in
fresh processes, alternately (recipec first in even rounds, genai first in odd ones), each through
bench/common.py's measure_batches at batch 1, and reports every round's TPOT p50 of both and the median of
the per-round ratios. recipec's side drives its engine over its slot runtime (what `recipec serve` runs),
closed loop, one request at a time.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C

ROUNDS = 4


def head_to_head(rows: list[dict[str, Any]], peers: dict[str, tuple[str, str]], report: dict[str, Any],
                 common_args: list[str], out_dir: Path, log_file: Path,
                 say: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """For each genai peer measured (peer -> (model dir, python)): its precision's best recipec variant in the
    one-pass rows (targets.best_variant) against it, interleaved."""
    from targets import GENAI_PEERS, best_variant

    ours = [r for r in rows if r["system"] == "recipec" and r["status"] == "ok"]
    out = {}
    for precision, peer in GENAI_PEERS.items():
        best = best_variant(ours, precision)
        if best is None or peer not in peers:
            continue
        say(f"head to head: recipec {best['variant']} and {peer}, interleaved")
        model_dir, python = peers[peer]
        paired = interleave(C.variant_dir(report, best["variant"]), Path(model_dir), Path(python), common_args,
                            out_dir, log_file, say=say)
        out[peer] = {"variant": best["variant"], **paired}
    return out


def interleave(recipec_dir: Path, genai_dir: Path, genai_python: Path, common_args: list[str], out_dir: Path,
               log_file: Path, rounds: int = ROUNDS, say: Callable[[str], None] = print) -> dict[str, Any]:
    """`rounds` alternating pairs of runs; TPOT p50 (ms) of each, and the median ratio recipec / genai."""
    commands = {
        "recipec": lambda out: [sys.executable, Path(__file__), "recipec", "--variant-dir", recipec_dir, "--out", out],
        "genai": lambda out: [genai_python, C.BENCH / "peers.py", "genai-bench", "--model-dir", genai_dir,
                              "--out", out],
    }
    measured: list[dict[str, float]] = []
    for index in range(rounds):
        order = ["recipec", "genai"] if index % 2 == 0 else ["genai", "recipec"]
        tpot = {}
        for system in order:
            out = out_dir / f"headtohead-{system}-{index}.json"
            C.run([*commands[system](out), *common_args, "--batches", "1"], log_file=log_file, timeout=1800)
            samples = json.loads(out.read_text())["runs"][0]["samples"]["tpot_ms"]
            tpot[system] = statistics.median(samples)
            out.unlink()
        tpot["ratio"] = tpot["recipec"] / tpot["genai"]
        say(f"  round {index + 1}/{rounds}: recipec {tpot['recipec']:.3f} ms, genai {tpot['genai']:.3f} ms "
            f"({tpot['ratio']:.2f}x)")
        measured.append(tpot)
    return {"rounds": measured,
            "recipec_tpot_ms": statistics.median(r["recipec"] for r in measured),
            "genai_tpot_ms": statistics.median(r["genai"] for r in measured),
            "ratio": statistics.median(r["ratio"] for r in measured),
            "method": f"{rounds} rounds of one fresh process per system, order alternating; each: "
                      "bench/common.py measure_batches at batch 1 (TPOT p50 over its requests); ratio = median of "
                      "the per-round ratios"}


def recipec_bench(args) -> dict[str, Any]:
    from recipec.runtime.engine import Engine, Policy
    from recipec.runtime.lm import load
    from recipec.runtime.slots import step_model

    lm = load(args.variant_dir, device="cpu", threads=args.threads or None)
    engine = Engine(step_model(lm, slots=1), Policy("continuous", max_batch_size=1), record_steps=False)

    def generate(prompts):
        start = engine.clock.now()
        requests = [engine.submit(p.tolist(), args.output) for p in prompts]
        for _ in range(len(prompts) * (args.output + 1) + 10):
            if all(r.finished for r in requests) or not engine.step(flush=True):
                break
        return start, [list(r.token_times) for r in requests]

    runs = C.measure_batches(generate, lm.vocab_size, args.batch_list, args.prompt, args.output, args.requests,
                             args.warmup, args.seed)
    return {"system": "recipec", "runs": runs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/headtohead.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["recipec"])
    parser.add_argument("--variant-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batches", default="1")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--output", type=int, default=64)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    args.batch_list = [int(b) for b in args.batches.split(",")]
    args.out.write_text(json.dumps(recipec_bench(args), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
