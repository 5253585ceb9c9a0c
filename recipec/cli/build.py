"""`recipec build RECIPE`: plan, run the stages through the cache, write out/<name>/, profile, check gates."""
from __future__ import annotations

from pathlib import Path

from recipec.cli.common import EXIT_FAILED, EXIT_OK
from recipec.core import console


def register(sub) -> None:
    p = sub.add_parser("build", help="run a recipe: artifacts and report under OUT/<name>/")
    p.add_argument("recipe", type=Path)
    p.add_argument("--out", type=Path, default=Path("out"), help="root under which <name>/ is written (default ./out)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="overrides serving.device")
    p.add_argument("--no-profile", action="store_true", help="skip profiling and the report")
    p.add_argument("--force", action="store_true", help="rerun every stage, ignoring the cache")
    p.add_argument("--cache-dir", type=Path, help="stage cache (default $RECIPEC_CACHE or ~/.cache/recipec)")
    p.set_defaults(handler=cmd_build)


def cmd_build(args) -> int:
    from recipec.plan.planner import load_plan
    from recipec.workflow import BuildOptions, build

    plan = load_plan(args.recipe)
    console.say(f"building {plan.recipe.name} from {args.recipe}")
    result = build(plan, BuildOptions(out_root=args.out, cache_root=args.cache_dir, device=args.device,
                                      force=args.force, profile=not args.no_profile))
    source = result.runs["source"].entry.meta["metrics"]
    if "eval_perplexity" in source:
        console.say(f"reference model: eval perplexity {source['eval_perplexity']:.2f} "
                    f"(vocabulary {source.get('vocab_size')} tokens)")
    console.say(f"wrote {result.out_dir}")
    for gate in result.failed_gates:
        console.error(f"gate failed: {gate['metric']} on {gate['variant']}: {gate.get('reason') or gate['value']}")
    return EXIT_OK if result.gates_passed else EXIT_FAILED
