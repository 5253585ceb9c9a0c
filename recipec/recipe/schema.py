"""The recipe schema: the base document here plus each pass's own `with` schema from the pass table.

schemas/recipe.schema.json is this function's output, committed so that editors and CI can use it
without installing recipec; tests/test_schema.py fails when the two drift apart.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import jsonschema
from typing import Any

from recipec.profile.projections import COST_SCHEMA
from recipec.recipe.search_schema import EMIT, search_section, searchable

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
SCHEMA_ID = "https://recipec.dev/schemas/recipe.schema.json"


def _data_section(default_seed: int, default_samples: int) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "description": "Where token windows come from: random ids (synthetic), text files (a corpus), or JSON lines.",
        "properties": {
            "source": {"enum": ["synthetic", "text", "jsonl"], "default": "synthetic"},
            "corpus": {"const": "stdlib", "description": "source: text — the Python standard library's sources."},
            "path": {"type": "string", "minLength": 1,
                     "description": "source: text — a file or glob; source: jsonl — a .jsonl file (relative to the recipe)."},
            "field": {"type": "string", "default": "text", "description": "source: jsonl — the field holding the text."},
            "samples": {"type": "integer", "minimum": 1, "maximum": 100000, "default": default_samples},
            "seq_len": {"type": "integer", "minimum": 2, "maximum": 32768, "default": 128},
            "seed": {"type": "integer", "minimum": 0, "default": default_seed},
        },
        "allOf": [
            {"if": {"properties": {"source": {"const": "jsonl"}}, "required": ["source"]},
             "then": {"required": ["path"]}},
            {"if": {"properties": {"source": {"const": "text"}}, "required": ["source"]},
             "then": {"oneOf": [{"required": ["corpus"]}, {"required": ["path"]}]}},
        ],
    }


def _model_section(pretrain_schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["source"],
        "properties": {
            "source": {"enum": ["synthetic", "path", "hub"]},
            "family": {"type": "string", "pattern": r"^[a-z0-9_]+$",
                       "description": "source: synthetic — a transformers model_type (llama, mistral, qwen2, gpt2, mixtral, qwen2_moe...)."},
            "config": {"type": "object", "default": {},
                       "description": "source: synthetic — overrides of the family's default config."},
            "seed": {"type": "integer", "minimum": 0, "default": 0},
            "path": {"type": "string", "minLength": 1,
                     "description": "source: path — a save_pretrained directory, relative to the recipe file."},
            "id": {"type": "string", "pattern": r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)?$",
                   "description": "source: hub — a Hugging Face model id."},
            "revision": {"type": "string", "default": "main"},
            "trust_remote_code": {"type": "boolean", "default": False},
            "dtype": {"enum": ["float32", "float16", "bfloat16"], "default": "float32"},
            "pretrain": {k: v for k, v in pretrain_schema.items() if k != "$schema"},
        },
        "allOf": [
            {"if": {"properties": {"source": {"const": "synthetic"}}}, "then": {"required": ["family"]}},
            {"if": {"properties": {"source": {"const": "path"}}}, "then": {"required": ["path"]}},
            {"if": {"properties": {"source": {"const": "hub"}}}, "then": {"required": ["id"]}},
            {"if": {"required": ["pretrain"]}, "then": {"properties": {"source": {"const": "synthetic"}}}},
        ],
    }


def _serving_section() -> dict[str, Any]:
    pos_int = {"type": "integer", "minimum": 1}
    return {
        "type": "object",
        "additionalProperties": False,
        "default": {},
        "properties": {
            "device": {"enum": ["auto", "cpu", "cuda"], "default": "auto"},
            "threads": {"type": "integer", "minimum": 0, "default": 0,
                        "description": "onnxruntime intra-op threads; 0 = onnxruntime's default."},
            "allow_cpu_fallback": {
                "type": "boolean", "default": False,
                "description": "device cuda: profile a variant even when onnxruntime runs some of its compute "
                               "nodes on the CPU for want of a CUDA kernel (report.json lists them under "
                               "placement); false fails that variant's profile."},
            "batching": {
                "type": "object", "additionalProperties": False, "default": {},
                "properties": {
                    "policy": {"enum": ["static", "dynamic", "continuous"], "default": "continuous"},
                    "max_batch_size": {**pos_int, "maximum": 1024, "default": 8},
                    "max_wait_ms": {"type": "number", "minimum": 0, "maximum": 60000, "default": 5},
                    "max_tokens_per_step": {**pos_int, "default": 4096,
                                            "description": "continuous: prefill+decode tokens one step may process."},
                },
            },
            "workload": {
                "type": "object", "additionalProperties": False, "default": {},
                "properties": {
                    "prompt_tokens": {"oneOf": [{**pos_int, "maximum": 32768}, _range_schema()], "default": 128},
                    "output_tokens": {"oneOf": [{**pos_int, "maximum": 32768}, _range_schema()], "default": 64},
                    "requests": {**pos_int, "maximum": 100000, "default": 16},
                    "warmup_requests": {"type": "integer", "minimum": 0, "default": 2},
                    "concurrency": {"oneOf": [pos_int, {"type": "array", "items": pos_int, "minItems": 1}],
                                    "default": [1]},
                    "arrival": {"enum": ["closed", "poisson"], "default": "closed"},
                    "prompts": _prompts_schema(),
                    # one flat schema, not oneOf: a bad rate is then reported at its own field (rate_rps.1)
                    "rate_rps": {"type": ["number", "array", "string"], "exclusiveMinimum": 0, "minItems": 1,
                                 "items": {"type": "number", "exclusiveMinimum": 0},
                                 "if": {"type": "string"}, "then": {"const": "auto"},
                                 "description": "arrival: poisson — a rate in requests/s, a list (one serving run "
                                                "each), or auto: a sweep from synchronous up to the measured "
                                                "saturation, as GuideLLM's sweep profile (docs/workloads.md)."},
                    "sweep_size": {**pos_int, "minimum": 3, "maximum": 50, "default": 6,
                                   "description": "rate_rps: auto — runs in the sweep: one synchronous, one at "
                                                  "full concurrency (throughput), and sweep_size − 2 Poisson rates "
                                                  "evenly spaced from the synchronous rate up to the throughput one."},
                    "burstiness": {"type": "number", "exclusiveMinimum": 0, "default": 1.0},
                    "seed": {"type": "integer", "minimum": 0, "default": 0},
                },
                "allOf": [{"if": {"properties": {"arrival": {"const": "poisson"}}, "required": ["arrival"]},
                           "then": {"required": ["rate_rps"]}}],
            },
            "speculative": {
                "type": "object", "additionalProperties": False, "required": ["method"],
                "description": "Speculative decoding (docs/speculative.md) in `recipec run`: a proposer guesses "
                               "`tokens` tokens, the variant verifies them in one forward; lossless (greedy "
                               "output is the variant's own). The profiler measures it at batch 1 against plain "
                               "decoding (report variants.<v>.speculative); the serving engine and `recipec "
                               "serve` do not speculate yet.",
                "properties": {
                    "method": {"enum": ["ngram", "draft"],
                               "description": "ngram: prompt lookup in the sequence so far; draft: a second "
                                              "variant of this build decodes the proposals."},
                    "tokens": {**pos_int, "maximum": 32, "default": 4, "description": "K, tokens proposed per step."},
                    "draft": {"type": "string", "minLength": 1, "description": "method draft: the draft's variant id."},
                    "max_ngram": {**pos_int, "maximum": 16, "default": 3,
                                  "description": "ngram: the longest suffix looked up (then shorter ones)."},
                },
                "allOf": [{"if": {"properties": {"method": {"const": "draft"}}, "required": ["method"]},
                           "then": {"required": ["draft"]}}],
            },
            "chat_template": {
                "type": "string", "minLength": 1,
                "description": "A Jinja chat template (as transformers' tokenizer_config.json chat_template) that "
                               "`recipec serve` renders /v1/chat/completions messages with, for a model whose "
                               "tokenizer has none or to replace its own; `recipec serve --chat-template FILE` "
                               "overrides it."},
            "batch_prompting": _batch_prompting_schema(),
            "cost": COST_SCHEMA,
            "slo": {
                "type": "object", "additionalProperties": False, "minProperties": 1,
                "description": "Service-level objectives in milliseconds (any subset): a request that meets every one "
                               "counts toward goodput_rps, reported for every serving run.",
                "properties": {key: {"type": "number", "exclusiveMinimum": 0}
                               for key in ("ttft_ms", "tpot_ms", "e2e_latency_ms")},
            },
        },
    }


def _prompts_schema() -> dict[str, Any]:
    return {
        "type": "object", "additionalProperties": False, "required": ["source", "path"],
        "description": "Prompts from data instead of random token ids: tokenized with each variant's tokenizer, "
                       "used in file order (cycled when requests outnumber them).",
        "properties": {
            "source": {"enum": ["jsonl", "text"]},
            "path": {"type": "string", "minLength": 1,
                     "description": "jsonl: a .jsonl file, one record per line; text: a file or glob, one prompt per "
                                    "non-blank line (relative to the recipe)."},
            "field": {"type": "string", "minLength": 1, "default": "text",
                      "description": "jsonl: the field holding the prompt."},
            "output_field": {"type": "string", "minLength": 1,
                             "description": "jsonl: a field holding each prompt's output length in tokens; "
                                            "without it, workload.output_tokens."},
            "truncate": {"type": "boolean", "default": False,
                         "description": "a prompt that does not fit the model's context with its output keeps its "
                                        "last tokens, with a warning; false: it is a validation error."},
        },
    }


def _batch_prompting_schema() -> dict[str, Any]:
    text = {"type": "string"}
    return {
        "type": "object", "additionalProperties": False, "required": ["size"],
        "description": "Batch prompting (Cheng et al., 2023): the workload's prompts are questions; `size` of them "
                       "go into one prompt with shared instructions and exemplars, and the numbered answers are "
                       "split back. The report compares it with each question alone (docs/workloads.md).",
        "properties": {
            "size": {"type": "integer", "minimum": 2, "maximum": 64, "description": "K, questions per prompt."},
            "answer_field": {"type": "string", "minLength": 1,
                             "description": "the field of each workload.prompts record holding its known answer; "
                                            "without it, accuracy is not measured."},
            "max_answer_tokens": {"type": "integer", "minimum": 1, "maximum": 1024, "default": 16,
                                  "description": "tokens one answer may take: a prompt of k questions may "
                                                 "generate k times as many; generation stops at end of sequence."},
            "concurrency": {"type": "integer", "minimum": 1, "default": 1,
                            "description": "closed-loop clients, the same alone and batched."},
            "template": {
                "type": "object", "additionalProperties": False, "default": {},
                "properties": {
                    "instructions": {**text, "default": "", "description": "the first line(s) of every prompt."},
                    "exemplars": {"type": "array", "default": [],
                                  "description": "few-shot examples, grouped K at a time like the questions.",
                                  "items": {"type": "object", "additionalProperties": False,
                                            "required": ["question", "answer"],
                                            "properties": {"question": text, "answer": text}}},
                    "question": {**text, "default": "Q[{n}]: {question}",
                                 "description": "one numbered question: {n} and {question}, once each."},
                    "answer": {**text, "default": "A[{n}]: {answer}",
                               "description": "one numbered answer: {n}, then {answer} ending the line."},
                },
            },
        },
    }


def _range_schema() -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "required": ["min", "max"],
            "properties": {"min": {"type": "integer", "minimum": 1}, "max": {"type": "integer", "minimum": 1}}}


def _gate() -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["metric"],
        "anyOf": [{"required": ["min"]}, {"required": ["max"]}],
        "properties": {
            "metric": {"type": "string", "minLength": 1, "description": "a report metric path, e.g. tpot_ms.p50"},
            "min": {"type": "number"},
            "max": {"type": "number"},
            "variant": {"type": "string", "description": "a variant id; omitted = every variant but baseline"},
        },
    }


def _pass_entry(params: dict[str, dict[str, Any]]) -> dict[str, Any]:
    ops = sorted(params)
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["id", "op"],
        "properties": {
            "id": {"type": "string", "pattern": ID_PATTERN},
            "op": {"enum": ops},
            "after": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}],
                      "description": "explicit parent stage id(s); default: the previous entry (or the source model)"},
            "with": {"type": "object", "default": {}},
            "emit": EMIT,
        },
        "allOf": [
            {"if": {"properties": {"op": {"const": op}}, "required": ["op"]},
             "then": {"properties": {"with": {"$ref": f"#/$defs/ops/{op}"}},
                      # an op with required parameters cannot lean on the empty default of `with`
                      **({"required": ["with"]} if params[op].get("required") else {})}}
            for op in ops
        ],
    }


def build_recipe_schema() -> dict[str, Any]:
    from recipec.passes import PASSES
    from recipec.source.pretrain import PRETRAIN_SCHEMA

    ops = sorted(PASSES)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "recipec recipe, version 1",
        "type": "object",
        "additionalProperties": False,
        "required": ["recipe", "name", "model"],
        "properties": {
            "recipe": {"const": 1, "description": "format version"},
            "name": {"type": "string", "pattern": NAME_PATTERN, "description": "names out/<name>/"},
            "description": {"type": "string"},
            "model": _model_section(PRETRAIN_SCHEMA),
            "data": {
                "type": "object", "additionalProperties": False, "default": {},
                "properties": {"calibration": {**_data_section(0, 32), "default": {}},
                               "eval": {**_data_section(1, 16), "default": {}}},
            },
            "passes": {"type": "array", "items": _pass_entry({op: PASSES[op].params for op in ops}), "default": []},
            "serving": _serving_section(),
            "gates": {"type": "array", "items": _gate(), "default": []},
            "search": search_section(_gate()),
        },
        "$defs": {"ops": {op: searchable(PASSES[op].params) for op in ops}},
    }


def schema_json(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=False) + "\n"


SCHEMAS_DIR = Path(__file__).resolve().parents[1] / "schemas"


def report_schema() -> dict[str, Any]:
    return json.loads((SCHEMAS_DIR / "report.schema.json").read_text())


@lru_cache(maxsize=1)
def recipe_schema() -> dict[str, Any]:
    schema = build_recipe_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema
