"""Profiling a build into report.json / report.md, and the `profile` and `compare` commands.

Quality is measured against the source model (the build's `source` stage, from the cache) on the
recipe's eval data; serving under the recipe's batching policy and workload; both by recipec.profiler.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any

import jsonschema

from . import console
from .versions import library_versions

GREEDY_PROMPTS, GREEDY_PROMPT_TOKENS, GREEDY_NEW_TOKENS = 4, 16, 16


def profile_build(plan, runs, staging: Path, device: str, result) -> None:
    recipe = plan.recipe
    stages = [{"id": r.stage.id, "op": r.stage.op, "seconds": r.entry.meta["seconds"], "cached": r.cached}
              for r in runs.values()]
    report = profile_variants(
        name=recipe.name, sha256=recipe.sha256, recipe_path=str(recipe.file), resolved=recipe.resolved,
        variants={v: staging / "variants" / v for v in plan.variants}, source_dir=runs["source"].entry.output,
        base_dir=recipe.base_dir, device=device, stages=stages)
    _write(staging, report)
    result.report = report
    result.gates_passed = report["gates_passed"]
    result.failed_gates = [g for g in report["gates"] if not g["passed"]]


def profile_variants(name: str, sha256: str, recipe_path: str, resolved: dict[str, Any], variants: dict[str, Path],
                     source_dir: Path | None, base_dir: Path, device: str, stages=None) -> dict[str, Any]:
    from .hardware import hardware_info
    from .profiler import profile_variant, source_reference
    from .report import build_report

    console.say("profiling: measuring this machine's peak bandwidth and FLOP/s")
    hardware = hardware_info(device)
    eval_tokens, reference = None, {"logits": None, "greedy": None}
    if source_dir is not None:
        from .data import RecipeData

        eval_tokens = RecipeData(resolved["data"], source_dir, base_dir).eval().numpy()
        prompts = [row[:GREEDY_PROMPT_TOKENS].tolist() for row in eval_tokens[:GREEDY_PROMPTS]]
        console.say("profiling: source model logits on the eval data")
        reference = source_reference(source_dir, eval_tokens, prompts, n_new=GREEDY_NEW_TOKENS)
    measured = {}
    for variant, directory in variants.items():
        console.say(f"profiling {variant}")
        entry = profile_variant(directory, resolved["serving"], device, eval_tokens, reference["logits"],
                                reference["greedy"], hardware=hardware, log=lambda s: console.say(f"  {s}"))
        entry["artifact"]["path"] = f"variants/{variant}"
        measured[variant] = entry
    return build_report({"name": name, "sha256": sha256, "path": recipe_path}, hardware, measured, resolved["gates"],
                        stages=stages, environment=library_versions())


def _write(out_dir: Path, report: dict[str, Any]) -> None:
    from .report import write_report

    write_report(out_dir, report)


# ---------------------------------------------------------------- commands

def add_report_commands(sub) -> None:
    p = sub.add_parser("profile", help="re-profile the artifacts of a build and rewrite its report")
    p.add_argument("build_dir", type=Path, help="out/<name>")
    p.add_argument("--url", help="instead, run the build's workload over HTTP against this OpenAI-compatible server "
                                 "(e.g. a running `recipec serve`) and print the runs as JSON")
    p.add_argument("--variant", action="append", help="profile only this variant (repeatable)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--workload", action="append", default=[], metavar="KEY=VALUE",
                   help="override serving.workload (e.g. requests=8, concurrency=1,4) or batching (policy=static)")
    p.add_argument("--cache-dir", type=Path, help="stage cache holding the source model (for quality)")
    p.set_defaults(handler=cmd_profile)

    p = sub.add_parser("compare", help="two reports side by side with deltas")
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.set_defaults(handler=cmd_compare)


def cmd_profile(args) -> int:
    from .cache import StageCache
    from .cli import EXIT_FAILED, EXIT_OK, UsageError
    from .executor import resolve_device

    console.quiet_libraries()
    manifest = _read_json(args.build_dir / "manifest.json", "not a recipec build directory (no manifest.json)")
    resolved = copy.deepcopy(manifest["recipe"]["resolved"])
    resolved["serving"] = _override_serving(resolved["serving"], args.workload)
    if args.url:
        return _profile_url(args.url, resolved["serving"])
    known = manifest["variants"]
    chosen = args.variant or list(known)
    unknown = [v for v in chosen if v not in known]
    if unknown:
        raise UsageError(f"no variant {unknown[0]!r} in {args.build_dir} (variants: {', '.join(known)})")
    if "baseline" not in chosen:
        chosen = ["baseline", *chosen]  # every row's delta is against the baseline, measured in the same run
    source = _source_dir(manifest, StageCache(args.cache_dir, warn=console.warn))
    device = resolve_device(args.device or resolved["serving"]["device"])
    report = profile_variants(
        manifest["recipe"]["name"], manifest["recipe"]["sha256"], manifest["recipe"]["file"], resolved,
        {v: args.build_dir / "variants" / v for v in chosen}, source, Path(manifest["recipe"]["file"]).parent, device,
        stages=[{"id": s["id"], "op": s["op"], "seconds": s["seconds"], "cached": s["cached"]} for s in manifest["stages"]])
    _write_in_place(args.build_dir, report)
    console.say(f"wrote {args.build_dir / 'report.md'}")
    for gate in report["gates"]:
        if not gate["passed"]:
            console.error(f"gate failed: {gate['metric']} on {gate['variant']}: {gate.get('reason') or gate['value']}")
    return EXIT_OK if report["gates_passed"] else EXIT_FAILED


def _profile_url(url: str, serving: dict[str, Any]) -> int:
    from .cli import EXIT_OK, UsageError
    from .serve import profile_url

    try:
        runs = profile_url(url, serving, log=lambda s: console.say(f"  {s}"))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(json.dumps(runs, indent=2, default=float))
    return EXIT_OK


def _source_dir(manifest: dict[str, Any], cache) -> Path | None:
    key = next(s["key"] for s in manifest["stages"] if s["id"] == "source")
    entry = cache.lookup(key)
    if entry is None:
        console.warn("the source model is no longer in the cache: quality is not measured (rebuild to restore it)")
        return None
    return entry.output


def _override_serving(serving: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    from .cli import UsageError
    from .recipe import recipe_schema

    serving = copy.deepcopy(serving)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise UsageError(f"--workload {item!r}: expected KEY=VALUE")
        section = "batching" if key in serving["batching"] or key == "policy" else "workload"
        value = [_number(v) for v in text.split(",")] if "," in text else _number(text)
        serving[section][key] = value
    schema = recipe_schema()["properties"]["serving"]
    try:
        jsonschema.Draft202012Validator(schema).validate(serving)
    except jsonschema.ValidationError as exc:
        where = ".".join(str(p) for p in exc.absolute_path)
        raise UsageError(f"--workload: serving.{where}: {exc.message}") from None
    return serving


def _number(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def _write_in_place(build_dir: Path, report: dict[str, Any]) -> None:
    """Write into a sibling directory, then rename each file over its old copy: readers never see half a report."""
    from .report import write_report

    staging = build_dir / f".report-{os.getpid()}"
    write_report(staging, report)
    for path in sorted(staging.rglob("*"), key=lambda p: len(p.parts)):
        target = build_dir / path.relative_to(staging)
        if path.is_dir():
            target.mkdir(exist_ok=True)
        else:
            os.replace(path, target)
    shutil.rmtree(staging, ignore_errors=True)


def cmd_compare(args) -> int:
    from .cli import EXIT_OK
    from .report import compare

    a = _read_json(args.a, "not a report")
    b = _read_json(args.b, "not a report")
    print(compare(a, b))
    return EXIT_OK


def _read_json(path: Path, what: str) -> dict[str, Any]:
    from .cli import UsageError

    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file ({what})") from None
    except ValueError as exc:
        raise UsageError(f"{path}: not valid JSON: {exc}") from None

