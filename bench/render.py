"""docs/benchmarks.md's section for one bench/run.py results file."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def _cell(run: dict[str, Any], key: str, digits: int = 1, spread: bool = True) -> str:
    s = run.get(key)
    if not s:
        return "-"
    text = f"{s['p50']:.{digits}f}"
    if spread and s["n"] > 1 and s["p50"]:
        half = (s["p90"] - s["p10"]) / 2 / s["p50"]
        text += f" ±{half:.0%}" if half < 10 else " ±>999%"
    ratio = (run.get("ratio_to_pytorch") or {}).get(key)
    return text + (f" ({ratio:.2f}×)" if ratio is not None else "")


def render_section(results: dict[str, Any]) -> str:
    hw = results["hardware"]
    command = f"python bench/run.py --size {results['size']}" + (
        f" --threads {results['threads']}" if results["threads"] else "")
    busy = " **The host was busy: these timings are not final.**" if results["busy"] else ""
    phases = ", ".join(f"{k} {v:.0f}" for k, v in results.get("phase_seconds", {}).items())
    lines = [(f"Run {results['started_at']} on {hw['name']} ({hw['cores']} cores, {hw['memory_gb']:.0f} GiB), "
              f"`{command}`: {results['wall_seconds'] / 60:.1f} min wall. Host load average (1/5/15 min) at start "
              f"{results['load_avg_start']}, at end {results['load_avg_end']}.{busy}"),
             "",
             (f"Measured memory bandwidth (the physical limit): **{results['bandwidth_gb_s']:.2f} GB/s** "
              f"({results['bandwidth_method']})."),
             "",
             f"Phases (s): {phases} (recipec phases include its builds: a stage missing from recipec's cache runs once).",
             ""]
    for model in results["models"]:
        cfg = model["config"]
        lines += [f"### {model['model']}: {model['parameters'] / 1e6:.1f}M parameters", "",
                  (f"`{model['recipe']}`: hidden {cfg.get('hidden_size')}, {cfg.get('num_hidden_layers')} layers, "
                   f"{cfg.get('num_attention_heads')} heads / {cfg.get('num_key_value_heads')} kv heads, vocabulary "
                   f"{cfg.get('vocab_size')}; prompt {model['workload']['prompt_tokens']}, output "
                   f"{model['workload']['output_tokens']}, {model['workload']['requests']} requests per batch size."),
                  ""]
        header = ["system", "variant", "prec.", "B", "TTFT ms", "TPOT ms", "e2e ms", "tok/s", "TPOT floor ms", "MBU",
                  "peak MiB", "size MiB", "KL", "ppl", "load"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in model["rows"]:
            if row["status"] != "ok":
                lines.append(f"| {row['system']} | {row['variant']} | {row['precision']} | | "
                             f"**{row['status']}**: {row['reason']} |" + " |" * (len(header) - 5))
                continue
            q = row["quality"] or {}
            for batch, run in sorted(row["runs"].items(), key=lambda kv: int(kv[0])):
                ratio_mem = (run.get("ratio_to_pytorch") or {}).get("peak_memory_mb")
                size_ratio = row.get("artifact_ratio_to_pytorch")
                lines.append("| " + " | ".join([
                    row["system"], row["variant"], row["precision"], batch,
                    _cell(run, "ttft_ms"), _cell(run, "tpot_ms", 2), _cell(run, "e2e_latency_ms", 0),
                    _cell(run, "output_throughput_tok_s", 0, spread=row["system"] != "recipec"),
                    "-" if run.get("tpot_floor_ms") is None else f"{run['tpot_floor_ms']:.2f}",
                    "-" if run.get("mbu") is None else f"{run['mbu']:.2f}" + ("†" if run.get("fits_in_llc") else ""),
                    "-" if not run.get("peak_memory_mb") else f"{run['peak_memory_mb']:.0f}"
                    + (f" ({ratio_mem:.2f}×)" if ratio_mem else ""),
                    _mib(row["artifact_bytes"]) + (f" ({size_ratio:.2f}×)" if size_ratio else ""),
                    "-" if q.get("kl_divergence") is None else f"{q['kl_divergence']:.4f}",
                    "-" if q.get("perplexity") is None else f"{q['perplexity']:.2f}",
                    ",".join(f"{x:.1f}" for x in (run.get("host_load_avg") or [])[:1] if x is not None) or "-",
                ]) + " |")
        if any(run.get("fits_in_llc") for row in model["rows"] for run in row["runs"].values()):
            llc = results.get("last_level_cache") or {}
            lines += ["", (f"† the bytes a decode step reads fit in the {llc.get('bytes', 0) / 2**20:.0f} MiB last-level "
                           "cache, so memory bandwidth is no bound for this run (MBU can exceed 1); copy bandwidth "
                           f"inside that cache measured {llc.get('bandwidth_gb_s', 0):.1f} GB/s.")]
        lines += ["", "Targets:", ""]
        for t in model["targets"]:
            mark = {True: "**met**", False: "**not met**", None: "**not evaluated**"}[t["met"]]
            lines.append(f"- {t['target']}: {mark} — {t['detail']}")
        lines.append("")
    return "\n".join(lines)


def update_docs(results: dict[str, Any], docs: Path) -> None:
    begin, end = f"<!-- bench:{results['size']}:begin -->", f"<!-- bench:{results['size']}:end -->"
    section = f"{begin}\n{render_section(results)}\n{end}"
    text = docs.read_text() if docs.is_file() else "# Benchmarks\n"
    if begin in text and end in text:
        text = text[:text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + f"\n\n## Results: --size {results['size']}\n\n{section}\n"
    docs.write_text(text)
