"""The checks of `serving.workload.prompts` and `serving.batch_prompting` that a schema cannot express: the
prompts file's records (present, UTF-8, with their fields), their fit in the model's context where the model's
tokenizer exists before the build (model.source: path), and the batch-prompting template."""
from __future__ import annotations

import json
from typing import Any

from recipec.errors import Problem
from recipec.recipe.loader import Recipe

WORKLOAD = ("serving", "workload")
TASK = ("serving", "batch_prompting")


def workload_problems(recipe: Recipe) -> list[Problem]:
    serving = recipe.resolved["serving"]
    spec, task = serving["workload"].get("prompts"), serving.get("batch_prompting")
    problems = _task_problems(recipe, task, spec, serving["workload"]) if task else []
    if serving["workload"].get("rate_rps") == "auto" and serving["workload"]["arrival"] != "poisson":
        problems.append(recipe.problem((*WORKLOAD, "rate_rps"), "auto sweeps Poisson rates: set arrival: poisson"))
    if spec:
        problems += _prompts_problems(recipe, spec, (task or {}).get("answer_field"))
    return problems


def _task_problems(recipe: Recipe, task: dict[str, Any], spec, workload: dict[str, Any]) -> list[Problem]:
    from recipec.profile.batch_prompting import template_problems

    problems = [recipe.problem((*TASK, "template", key), message)
                for key, message in template_problems(task.get("template", {}))]
    if not spec:
        problems.append(recipe.problem(TASK, "needs serving.workload.prompts: its records are the questions"))
    if task["size"] > workload["requests"]:
        problems.append(recipe.problem((*TASK, "size"), f"{task['size']} questions per prompt, but the workload has "
                                                        f"{workload['requests']} requests (serving.workload.requests)"))
    return problems


def _prompts_problems(recipe: Recipe, spec: dict[str, Any], answer: str | None) -> list[Problem]:
    from recipec.source.prompts import PromptsError, read_prompts

    try:
        records = read_prompts(spec, recipe.base_dir, (answer,) if answer else ())
    except PromptsError as exc:
        where = (*TASK, "answer_field") if exc.key == "more_fields" else (*WORKLOAD, "prompts", exc.key)
        return [recipe.problem(where, str(exc))]
    return _fit_problems(recipe, spec, records)


def _fit_problems(recipe: Recipe, spec: dict[str, Any], records) -> list[Problem]:
    """Prompt lengths against the context, with the model's own tokenizer where it exists before the build; a
    pretrained model's tokenizer is trained by the build, so its prompts are checked before its first serving
    run instead."""
    from recipec.source.prompts import PromptsError, context_length, load_tokenizer, tokenize_prompts

    model = recipe.resolved["model"]
    if model["source"] == "synthetic" and "pretrain" not in model:
        return [recipe.problem((*WORKLOAD, "prompts"), "the model has no tokenizer to encode prompts with (a "
                                                       "synthetic model without pretrain); use random prompts")]
    if model["source"] != "path":
        return []
    model_dir = recipe.base_dir / model["path"]
    if not (model_dir / "config.json").is_file():
        return []  # the model's own problem, reported at model.path
    tokenizer = load_tokenizer(model_dir)
    if tokenizer is None:
        return [recipe.problem((*WORKLOAD, "prompts"), f"the model at {str(model_dir)!r} has no tokenizer to "
                                                       "encode prompts with")]
    context = context_length(json.loads((model_dir / "config.json").read_text()))
    output = recipe.resolved["serving"]["workload"]["output_tokens"]
    longest = int(output["max"]) if isinstance(output, dict) else int(output)
    try:
        tokenize_prompts(records, lambda text: tokenizer(text)["input_ids"], context, longest, spec["truncate"])
    except PromptsError as exc:
        return [recipe.problem((*WORKLOAD, "prompts", exc.key), str(exc))]
    return []
