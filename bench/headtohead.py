"""The pairs bench/targets.py compares, measured again at batch 1 in alternating rounds: one loop for all.

    python bench/headtohead.py recipec --variant-dir DIR --out FILE [--prompt 128 --output 64 --requests 8]

bench/run.py measures every recipec variant inside `recipec build`, PyTorch eager and each peer minutes apart.
On a shared host whose speed drifts by tens of percent within minutes (docs/benchmarks.md), two such numbers
compare the host's moments as much as the systems. `head_to_head` measures each compared pair (recipec's best
variant against genai's build, TPOT; the e2e target's variant against PyTorch eager, e2e; a phase-split variant
against its prefill and decode variants, TTFT and TPOT) in fresh processes, the order rotating every round,
each through bench/common.py's measure_batches at batch 1, and reports every round's p50s and the median of
the per-round ratios. recipec's side (this file's `recipec` command) drives its engine over its slot runtime
(what `recipec serve` runs), closed loop, one request at a time.
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


METRICS = ("ttft_ms", "tpot_ms", "e2e_latency_ms")


def head_to_head(rows: list[dict[str, Any]], peers: dict[str, tuple[str, str]], report: dict[str, Any],
                 source: Path, common_args: list[str], out_dir: Path, log_file: Path,
                 say: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """The pairings behind the targets that compare two rows, each measured interleaved: each genai peer among
    those measured (`peers`: peer -> (model dir, python)) against its precision's best recipec variant (TPOT); the best
    variant within the KL gate against PyTorch eager (e2e); each phase-split variant against its prefill (TTFT)
    and decode (TPOT) variants. The variants are the ones targets.py picks from the one-pass rows."""
    from targets import GENAI_PEERS, best_e2e_variant, best_variant

    ours = [r for r in rows if r["system"] == "recipec" and r["status"] == "ok"]
    recipec = lambda v: [sys.executable, Path(__file__), "recipec", "--variant-dir", C.variant_dir(report, v)]  # noqa: E731
    pair = lambda commands: interleave(commands, common_args, out_dir, log_file, say=say)  # noqa: E731
    out: dict[str, dict[str, Any]] = {}
    for precision, peer in GENAI_PEERS.items():
        best = best_variant(ours, precision)
        if best is None or peer not in peers:
            continue
        say(f"head to head: recipec {best['variant']} and {peer}, TPOT")
        model_dir, python = peers[peer]
        rounds = pair({"recipec": recipec(best["variant"]),
                       "genai": [python, C.BENCH / "peers.py", "genai-bench", "--model-dir", model_dir]})
        out[peer] = {"variant": best["variant"], **_summary(rounds, "tpot_ms", "recipec", "genai")}
    best = best_e2e_variant(ours, any(r["system"] == "pytorch-eager" for r in rows))
    if best is not None:
        say(f"head to head: recipec {best['variant']} and PyTorch eager, e2e")
        rounds = pair({"recipec": recipec(best["variant"]),
                       "eager": [sys.executable, C.BENCH / "common.py", "torch-eager", "--model-dir", source]})
        out["eager"] = {"variant": best["variant"], **_summary(rounds, "e2e_latency_ms", "recipec", "eager")}
    for row in ours:
        split = row.get("phase_split") or {}
        if not {split.get("prefill"), split.get("decode")} <= set(report["variants"]):
            continue
        say(f"head to head: {row['variant']} and its prefill {split['prefill']} and decode {split['decode']} variants")
        rounds = pair({name: recipec(name) for name in (row["variant"], split["prefill"], split["decode"])})
        out[f"split:{row['variant']}"] = {
            "prefill": split["prefill"], "decode": split["decode"],
            "ttft": _summary(rounds, "ttft_ms", row["variant"], split["prefill"]),
            "tpot": _summary(rounds, "tpot_ms", row["variant"], split["decode"])}
    return out


def _summary(rounds: list[dict[str, dict[str, float]]], metric: str, ours: str, theirs: str) -> dict[str, Any]:
    """One metric of two systems over the rounds: each round's value of both and their ratio, and medians."""
    paired = [{"recipec": r[ours][metric], "other": r[theirs][metric], "ratio": r[ours][metric] / r[theirs][metric]}
              for r in rounds]
    return {"metric": metric, "rounds": paired,
            "recipec_ms": statistics.median(p["recipec"] for p in paired),
            "other_ms": statistics.median(p["other"] for p in paired),
            "ratio": statistics.median(p["ratio"] for p in paired),
            "method": f"{len(rounds)} rounds, one fresh process per system, the order rotating; each: "
                      "bench/common.py measure_batches at batch 1 (p50 over its requests); ratio = median of the "
                      "per-round ratios"}


def interleave(commands: dict[str, list], common_args: list[str], out_dir: Path, log_file: Path,
               rounds: int = ROUNDS, say: Callable[[str], None] = print) -> list[dict[str, dict[str, float]]]:
    """`rounds` rounds of one run per system (command + --out FILE), the order rotating by one each round;
    per round and system the p50 of each of METRICS over its requests."""
    names = list(commands)
    measured = []
    for index in range(rounds):
        shift = index % len(names)
        result = {}
        for name in names[shift:] + names[:shift]:
            out = out_dir / f"headtohead-{index}-{len(result)}.json"
            C.run([*map(str, commands[name]), "--out", out, *common_args, "--batches", "1"], log_file=log_file,
                  timeout=3600)
            samples = json.loads(out.read_text())["runs"][0]["samples"]
            result[name] = {m: statistics.median(samples[m]) for m in METRICS}
            out.unlink()
        say("  round {}/{}: {}".format(index + 1, rounds, ", ".join(
            f"{n} ttft {v['ttft_ms']:.1f} tpot {v['tpot_ms']:.3f} e2e {v['e2e_latency_ms']:.0f} ms"
            for n, v in result.items())))
        measured.append(result)
    return measured


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
