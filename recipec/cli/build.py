"""`recipec build RECIPE`: plan, run the stages through the cache, write out/<name>/, profile, check gates."""
from __future__ import annotations

from pathlib import Path

from recipec.cli.common import EXIT_FAILED, EXIT_OK
from recipec.errors import UsageError
from recipec.core import console


def register(sub) -> None:
    p = sub.add_parser("build", help="run a recipe: artifacts and report under OUT/<name>/")
    p.add_argument("recipe", type=Path)
    p.add_argument("--out", type=Path, default=Path("out"), help="root under which <name>/ is written (default ./out)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="overrides serving.device")
    p.add_argument("--no-profile", action="store_true", help="skip profiling and the report")
    p.add_argument("--force", action="store_true", help="rerun every stage, ignoring the cache")
    p.add_argument("--cache-dir", help="stage cache: a directory or an fsspec URL such as s3://bucket/prefix "
                                       "(default $RECIPEC_CACHE or ~/.cache/recipec)")
    p.add_argument("--executor", choices=["local", "ray"],
                   help="where stages and measurements run (default $RECIPEC_EXECUTOR or local)")
    p.add_argument("--ray-address", help="the Ray cluster to join (default $RAY_ADDRESS; neither: a local Ray "
                                         "instance)")
    p.set_defaults(handler=cmd_build)


def cmd_build(args) -> int:
    from recipec.plan.planner import load_plan
    from recipec.workflow import BuildOptions, build

    plan = load_plan(args.recipe)
    options = BuildOptions(out_root=args.out, cache_root=args.cache_dir, device=args.device, force=args.force,
                           profile=not args.no_profile, executor=args.executor, ray_address=args.ray_address)
    console.say(f"building {plan.recipe.name} from {args.recipe}")
    if plan.search:
        if args.no_profile:
            raise UsageError("build --no-profile: a searching recipe measures every trial; drop --no-profile")
        from recipec.search import build_search

        result = build_search(plan, options)
    else:
        result = build(plan, options)
    source = result.runs["source"].entry.meta["metrics"]
    if "eval_perplexity" in source:
        console.say(f"reference model: eval perplexity {source['eval_perplexity']:.2f} "
                    f"(vocabulary {source.get('vocab_size')} tokens)")
    console.say(f"wrote {result.out_dir}")
    for gate in result.failed_gates:
        console.error(f"gate failed: {gate['metric']} on {gate['variant']}: {gate.get('reason') or gate['value']}")
    found = _say_recommendation(result.report["search"]) if plan.search else True
    return EXIT_OK if result.gates_passed and found else EXIT_FAILED


def _say_recommendation(search: dict) -> bool:
    """Print the recommended trial and why; False when no trial is feasible."""
    objective = search["objective"]
    what = f"{objective['direction']} {objective['metric']} at {objective['at']}"
    best = next((t for t in search["trials"] if t["variant"] == search["recommended"]), None)
    feasible = sum(t["feasible"] for t in search["trials"])
    if best is None:
        console.error(f"search: no feasible trial among {len(search['trials'])}: every one breaks a constraint "
                      "or was not measured (report.md lists why)")
        return False
    kl = best["metrics"].get("kl_divergence")
    console.say(f"search: recommended {best['variant']}: {objective['metric']} {best['metrics']['objective']:.4g} "
                f"({what}), KL {'-' if kl is None else f'{kl:.4g}'}, the best of {feasible} feasible trial(s) of {len(search['trials'])}"
                + (" (on the Pareto front)" if best["pareto"] else ""))
    return True
