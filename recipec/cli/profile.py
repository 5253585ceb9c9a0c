"""`recipec profile OUT/NAME`: re-profile a build's variants (or a running server) and rewrite its report."""
from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any

from recipec.cli.common import EXIT_FAILED, EXIT_OK
from recipec.core import console
from recipec.errors import UsageError


def register(sub) -> None:
    p = sub.add_parser("profile", help="re-profile the artifacts of a build and rewrite its report")
    p.add_argument("build_dir", type=Path, help="out/<name>")
    p.add_argument("--url", help="instead, run the build's workload over HTTP against this OpenAI-compatible server "
                                 "(e.g. a running `recipec serve`) and print the runs as JSON")
    p.add_argument("--variant", action="append", help="profile only this variant (repeatable)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--workload", action="append", default=[], metavar="KEY=VALUE",
                   help="override serving.workload (e.g. requests=8, concurrency=1,4), batching (policy=static) or the "
                        "SLO (slo.ttft_ms=200)")
    p.add_argument("--cache-dir", help="stage cache holding the source model (for quality): a directory or an fsspec URL")
    p.set_defaults(handler=cmd_profile)


def cmd_profile(args) -> int:
    from recipec.build.cache import StageCache
    from recipec.core.builddir import chosen_variants, read_manifest
    from recipec.onnx.sessions import resolve_device
    from recipec.profile.variants import profile_variants

    console.quiet_libraries()
    manifest = read_manifest(args.build_dir)
    resolved = copy.deepcopy(manifest["recipe"]["resolved"])
    resolved["serving"] = _override_serving(resolved["serving"], args.workload)
    if args.url:
        return _profile_url(args.url, resolved["serving"], args.build_dir, Path(manifest["recipe"]["file"]).parent)
    chosen = chosen_variants(manifest, args.variant, args.build_dir)
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


def _profile_url(url: str, serving: dict[str, Any], build_dir: Path, recipe_dir: Path) -> int:
    """The runs, and the capacity at the SLO a rate sweep gives, as JSON: the same numbers for recipec's server
    and any other OpenAI-compatible one. Prompts from data are tokenized with the build's baseline tokenizer."""
    from recipec.profile.remote import profile_url
    from recipec.profile.sweep import variant_capacity
    from recipec.profile.workload import prepare_runs

    prepare = lambda runs: prepare_runs(runs, serving, build_dir / "variants" / "baseline", recipe_dir,  # noqa: E731
                                        console.warn)
    try:
        runs = profile_url(url, serving, log=lambda s: console.say(f"  {s}"), prepare=prepare)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    capacity = variant_capacity(runs)
    print(json.dumps({"url": url, "runs": runs, "capacity_at_slo_rps": capacity[0]["capacity_at_slo_rps"]
                      if capacity else None, "capacity": capacity}, indent=2, default=float))
    return EXIT_OK


def _source_dir(manifest: dict[str, Any], cache) -> Path | None:
    key = next(s["key"] for s in manifest["stages"] if s["id"] == "source")
    entry = cache.lookup(key)
    if entry is None:
        console.warn("the source model is no longer in the cache: quality is not measured (rebuild to restore it)")
        return None
    return entry.output


def _override_serving(serving: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    import jsonschema

    from recipec.recipe.schema import recipe_schema

    serving = copy.deepcopy(serving)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise UsageError(f"--workload {item!r}: expected KEY=VALUE")
        value = [_number(v) for v in text.split(",")] if "," in text else _number(text)
        if key.startswith("slo."):
            serving.setdefault("slo", {})[key.removeprefix("slo.")] = value
            continue
        section = "batching" if key in serving["batching"] or key == "policy" else "workload"
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
    from recipec.profile.report import write_report

    staging = build_dir / f".report-{os.getpid()}"
    write_report(staging, report)
    for path in sorted(staging.rglob("*"), key=lambda p: len(p.parts)):
        target = build_dir / path.relative_to(staging)
        if path.is_dir():
            target.mkdir(exist_ok=True)
        else:
            os.replace(path, target)
    shutil.rmtree(staging, ignore_errors=True)
