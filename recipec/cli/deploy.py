"""`recipec deploy triton|genai BUILD_DIR`: write serving configs for a build's variants."""
from __future__ import annotations

from pathlib import Path

from recipec.cli.common import EXIT_OK, override_policy
from recipec.core import builddir, console
from recipec.deploy.genai import genai_unsupported, write_genai_config
from recipec.deploy.triton import INSTANCE_KINDS, write_triton_repo
from recipec.errors import UsageError
from recipec.onnx import artifact as art
from recipec.runtime.engine import POLICIES, policy_from_serving


def register(sub) -> None:
    p = sub.add_parser("deploy", help="write serving configs for a build (Triton repository, onnxruntime-genai)")
    targets = p.add_subparsers(metavar="TARGET")
    t = targets.add_parser("triton", help="write OUT/NAME/triton/: config.pbtxt and model per variant")
    t.add_argument("build_dir", type=Path, help="out/<name>")
    t.add_argument("--variant", action="append", help="only this variant (repeatable; default all)")
    t.add_argument("--device", choices=list(INSTANCE_KINDS), help="instance kind (default: the build's device)")
    t.add_argument("--policy", choices=list(POLICIES), help="batching policy (default: the recipe's)")
    t.add_argument("--max-batch-size", type=int, help="default: the recipe's")
    t.add_argument("--max-wait-ms", type=float, help="default: the recipe's")
    t.set_defaults(handler=cmd_deploy_triton)
    g = targets.add_parser("genai", help="write genai_config.json into each variant onnxruntime-genai can run")
    g.add_argument("build_dir", type=Path, help="out/<name>")
    g.add_argument("--variant", action="append", help="only this variant (repeatable; default all)")
    g.set_defaults(handler=cmd_deploy_genai)
    p.set_defaults(handler=lambda args: _usage(p))


def _usage(parser) -> int:
    raise UsageError(f"{parser.prog}: name a target: triton or genai")


def cmd_deploy_triton(args) -> int:
    manifest = builddir.command_manifest(args.build_dir, args.variant)
    policy = override_policy(policy_from_serving(manifest["recipe"]["resolved"].get("serving", {})), args,
                             "deploy triton")
    repo = write_triton_repo(args.build_dir, manifest, args.variant, args.device, policy)
    console.say(f"wrote {repo} ({policy.batching} batching): tritonserver --model-repository {repo.resolve()}")
    return EXIT_OK


def cmd_deploy_genai(args) -> int:
    manifest = builddir.read_manifest(args.build_dir)
    for variant in builddir.chosen_variants(manifest, args.variant, args.build_dir):
        variant_dir = builddir.variant_dir(args.build_dir, variant)
        written = write_genai_config(variant_dir)
        if written:
            console.say(f"wrote {written}")
        else:
            console.warn(f"{variant}: no genai_config.json: {genai_unsupported(art.read_artifact(variant_dir))}")
    return EXIT_OK
