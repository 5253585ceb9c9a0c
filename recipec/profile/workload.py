"""Workloads from data: `serving.workload.prompts` tokenized with each variant's tokenizer into the planned
serving runs, and `serving.batch_prompting` prepared, measured and scored.

Text is tokenized (and completions decoded) here, in the builder, which has transformers; the serving
process gets token ids in its runs and returns token ids, so it never loads a tokenizer.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

from recipec.errors import PassError
from recipec.profile import batch_prompting as bp
from recipec.profile.loadgen import Item, drive
from recipec.profile.metrics import throughput_summary
from recipec.profile.sweep import variant_capacity
from recipec.runtime.engine import Engine, Policy
from recipec.runtime.records import RequestRecord
from recipec.runtime.slots import step_model

POLICY_KEYS = ("batching", "max_batch_size", "max_wait_ms", "max_tokens_per_step", "warmup_requests", "seed")


def prepare_runs(runs: Sequence[dict[str, Any]], serving: dict[str, Any], variant_dir: Path, base_dir: Path,
                 warn: Callable[[str], None]) -> list[dict[str, Any]]:
    """The planned runs with the workload's prompts as this variant's token ids, and the batch-prompting
    measurement appended; unchanged when the workload has random prompts."""
    from recipec.source.prompts import context_length, read_prompts, tokenize_prompts

    workload, spec = serving.get("workload", {}), serving.get("workload", {}).get("prompts")
    if not spec:
        return list(runs)
    task = serving.get("batch_prompting")
    answer = (task or {}).get("answer_field")
    records = read_prompts(spec, base_dir, (answer,) if answer else ())
    tokenizer = variant_tokenizer(variant_dir)
    encode = lambda text: tokenizer(text)["input_ids"]  # noqa: E731
    context = context_length(json.loads((Path(variant_dir) / "config.json").read_text()))
    longest = _longest(workload.get("output_tokens", 64))
    tokens = tokenize_prompts(records, encode, context, longest, spec.get("truncate", False))
    if tokens.truncated:
        warn(f"{len(tokens.truncated)} prompt(s) did not fit the context of {context} tokens with their output and "
             f"keep their last tokens (serving.workload.prompts.truncate), the first at {tokens.truncated[0]}")
    source = {"source": spec["source"], "path": spec["path"], "records": len(records),
              "truncated": len(tokens.truncated), **({"field": spec["field"]} if spec["source"] == "jsonl" else {})}
    lengths = [len(ids) for ids in tokens.ids]
    prompts = {"ids": tokens.ids, "output_tokens": tokens.output_tokens, "source": source}
    out = [{**run, "prompts": prompts, "prompt_tokens": {"min": min(lengths), "max": max(lengths)},
            **({"output_tokens": {"min": min(tokens.output_tokens), "max": max(tokens.output_tokens)}}
               if tokens.output_tokens else {})} for run in runs]
    if task and runs:
        out.append(batch_prompting_run(task, records, answer, encode, context, runs[0], workload["requests"]))
    return out


def variant_tokenizer(variant_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(variant_dir)
    except (OSError, ValueError) as exc:
        raise PassError(f"{variant_dir}: serving.workload.prompts needs the variant's tokenizer, which does not "
                        f"load: {str(exc).splitlines()[0]}") from None


def _longest(v: Any) -> int:
    return int(v["max"]) if isinstance(v, dict) else int(v)


def batch_prompting_run(task: dict[str, Any], records, answer: str | None, encode, context: int | None,
                        first: dict[str, Any], requests: int) -> dict[str, Any]:
    """The run that measures batch prompting: the first `requests` questions (cycled) alone and in groups of
    `size`, under the first run's batching policy."""
    t, size, most = bp.Template.of(task.get("template", {})), task["size"], task.get("max_answer_tokens", 16)
    chosen = [records[i % len(records)] for i in range(requests)]
    sets = {"alone": [[r] for r in chosen], "batched": bp.groups(chosen, size)}
    ways, texts = {}, {}
    for way, groups in sets.items():
        texts[way] = [bp.pack([r.text for r in g], t) for g in groups]
        ids = [encode(text) for text in texts[way]]
        budget = [len(g) * most for g in groups]
        _check_fits(ids, budget, context, way, size)
        ways[way] = {"ids": ids, "max_new": budget, "sizes": [len(g) for g in groups]}
    return {**{k: first[k] for k in POLICY_KEYS if k in first}, **ways,
            "batch_prompting": {"size": size, "template": task.get("template", {}),
                                "answers": [str(r.record[answer]) for r in chosen] if answer else None,
                                "concurrency": task.get("concurrency", 1), "example_prompt": texts["batched"][0]}}


def _check_fits(ids: list[list[int]], budget: list[int], context: int | None, way: str, size: int) -> None:
    worst = max(len(p) + b for p, b in zip(ids, budget))
    if context is not None and worst > context:
        raise PassError(f"serving.batch_prompting: a {way} prompt with its answers' token budget "
                        f"(max_answer_tokens per question) needs {worst} tokens, more than the model's context of "
                        f"{context}" + (f"; lower size ({size}) or max_answer_tokens" if way == "batched" else ""))


def measure_batch_prompting(model, run: dict[str, Any], clock, cache_ops, log: Callable[[str], None]) -> dict[str, Any]:
    """In the serving process: both ways through the engine, closed loop at the task's concurrency, stopping at
    end of sequence (or the budget); token ids and timestamps out."""
    policy = Policy(run["batching"], run["max_batch_size"], run["max_wait_ms"], run["max_tokens_per_step"])
    longest = max(len(p) + b for way in ("alone", "batched") for p, b in zip(run[way]["ids"], run[way]["max_new"]))
    model = step_model(model, policy.max_batch_size, longest)
    engine = Engine(model, policy, clock, cache_ops, eos_token_id=getattr(model, "eos_token_ids", None))
    cap, out = run["batch_prompting"]["concurrency"], {}
    for way in ("alone", "batched"):
        log(f"batch prompting: {way}, {len(run[way]['ids'])} prompts")
        items = [Item(p, b) for p, b in zip(run[way]["ids"], run[way]["max_new"])]
        warm = items[:run.get("warmup_requests", 0)]
        drive(engine, warm, [0.0] * len(warm), cap, clock, ignore_eos=False)
        res = drive(engine, items, [0.0] * len(items), cap, clock, ignore_eos=False)
        out[way] = {"records": [asdict(r) for r in res.records], "outputs": res.outputs, "sizes": run[way]["sizes"]}
    return {"run": {k: v for k, v in run.items() if k not in ("alone", "batched")}, **out}


def batch_prompting_section(raw: dict[str, Any], variant_dir: Path) -> dict[str, Any]:
    """The report's variants[v].batch_prompting from the serving process's raw measurement."""
    task = raw["run"]["batch_prompting"]
    t, tokenizer = bp.Template.of(task["template"]), variant_tokenizer(variant_dir)
    ways = {}
    for way in ("alone", "batched"):
        records = [RequestRecord(**r) for r in raw[way]["records"]]
        texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in raw[way]["outputs"]]
        answers = [a for text, k in zip(texts, raw[way]["sizes"]) for a in bp.split_answers(text, k, t)]
        ways[way] = {"answers": answers, "prompt_tokens": [r.n_in for r in records],
                     "output_tokens": [r.n_out for r in records], "texts": texts,
                     "seconds": throughput_summary(records)["duration_s"]}
    section = bp.summary(task["size"], task["answers"], ways["alone"], ways["batched"])
    return {**section, "batching": raw["run"]["batching"], "concurrency": task["concurrency"],
            "example": {"prompt": task["example_prompt"], "completion": ways["batched"]["texts"][0]}}


def workload_sections(serving: list[dict[str, Any]], raw_runs: list[dict[str, Any]], variant_dir: Path) -> dict[str, Any]:
    """A variant's capacity at the SLO (from its rate runs) and batch-prompting result, where measured."""
    out: dict[str, Any] = {}
    capacity = variant_capacity(serving)
    if capacity:  # the first policy's is the variant's headline figure; each policy's is in `capacity`
        out.update(capacity_at_slo_rps=capacity[0]["capacity_at_slo_rps"], capacity=capacity)
    task = next((r for r in raw_runs if r["run"].get("batch_prompting")), None)
    if task is not None:
        out["batch_prompting"] = batch_prompting_section(task, variant_dir)
    return out
