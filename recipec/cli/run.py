"""`recipec run BUILD_DIR --prompt ...`: generate from a built variant, streaming the text, then the call's
TTFT and TPOT. With the recipe's serving.speculative, or --speculative, it decodes speculatively
(docs/speculative.md) and prints the acceptance rate and tokens per target step too."""
from __future__ import annotations

import sys
from pathlib import Path

from recipec.cli.common import EXIT_OK, speculation
from recipec.core import builddir, console
from recipec.errors import UsageError


def register(sub) -> None:
    p = sub.add_parser("run", help="generate text from a built variant")
    p.add_argument("build_dir", type=Path, help="out/<name>")
    p.add_argument("--variant", default="baseline")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--speculative", choices=["ngram", "draft", "off"],
                   help="speculative decoding method; overrides the recipe's serving.speculative (off: none)")
    p.add_argument("--speculative-tokens", type=int, metavar="K", help="tokens proposed per step (default: "
                   "the recipe's, else 4)")
    p.add_argument("--draft", metavar="VARIANT", help="the draft model's variant (method draft)")
    p.set_defaults(handler=cmd_run)


def cmd_run(args) -> int:
    # onnx and onnxruntime: only the command that runs a model pays for loading them.
    from recipec.runtime import lm as runtime

    console.quiet_libraries()
    variant_dir = builddir.variant_dir(args.build_dir, args.variant)
    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be at least 1")
    lm = runtime.load(variant_dir, device=args.device)
    tokenizer = runtime.tokenizer(variant_dir)
    prompt = _prompt_ids(args.prompt, tokenizer)
    spec = speculation(args, _recipe_serving(args.build_dir))
    proposer = _proposer(spec, lm, args) if spec is not None else None
    stream = _Stream(tokenizer, prompt)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                    on_token=lambda _seq, token, _t: stream.add(token))
    if spec is None:
        result = lm.generate([prompt], args.max_new_tokens, **sampling)
    else:
        from recipec.runtime.speculative import generate_speculative

        result = generate_speculative(lm, [prompt], args.max_new_tokens, spec, proposer=proposer, **sampling)
    stream.finish()
    tpot = result.tpot(0)
    console.say(f"{len(result.tokens[0])} tokens ({result.finish_reasons[0]}) on {lm.device}: "
                f"TTFT {result.ttft(0) * 1000:.1f} ms, TPOT {'n/a' if tpot is None else f'{tpot * 1000:.2f} ms'} "
                "(wall clock of this call at batch 1, model loading excluded)")
    if spec is not None:
        console.say(_spec_line(spec, result.stats))
    return EXIT_OK


def _proposer(spec, lm, args):
    from recipec.runtime import lm as runtime
    from recipec.runtime.speculative import make_proposer

    draft = None
    if spec.method == "draft":
        draft = runtime.load(builddir.variant_dir(args.build_dir, spec.draft), device=args.device)
    try:
        return make_proposer(spec, lm, draft)
    except ValueError as exc:  # a draft whose vocabulary is not the target's
        raise UsageError(f"draft variant {spec.draft!r}: {exc}") from None


def _recipe_serving(build_dir: Path) -> dict:
    """The build's serving section; a variants/ directory without a manifest has none."""
    if not (Path(build_dir) / builddir.MANIFEST).is_file():
        return {}
    manifest = builddir.read_manifest(build_dir)
    return ((manifest.get("recipe") or {}).get("resolved") or {}).get("serving") or {}


def _spec_line(spec, stats) -> str:
    rate, per_step = stats.acceptance_rate, stats.tokens_per_target_step
    method = f"draft {spec.draft}" if spec.method == "draft" else f"ngram (n <= {spec.max_ngram})"
    return (f"speculative {method}, K={spec.tokens}: {stats.accepted}/{stats.proposed} proposed tokens accepted "
            f"({'n/a' if rate is None else f'{rate:.0%}'}), "
            f"{'n/a' if per_step is None else f'{per_step:.2f}'} tokens per target step "
            f"over {stats.target_steps} steps")


def _prompt_ids(prompt: str, tokenizer) -> list[int]:
    if tokenizer is not None:
        ids = tokenizer(prompt)["input_ids"]
    else:
        try:
            ids = [int(t) for t in prompt.replace(",", " ").split()]
        except ValueError:
            raise UsageError("this model has no tokenizer: give the prompt as token ids, "
                             "e.g. --prompt '1 5 9'") from None
    if not ids:
        raise UsageError("the prompt is empty")
    return ids


class _Stream:
    """Prints text as it is generated: decodes the whole continuation and prints what is new, since a
    byte-level BPE token can be half of a UTF-8 character."""

    def __init__(self, tokenizer, prompt: list[int]):
        self.tokenizer, self.tokens, self.shown = tokenizer, [], ""
        if tokenizer is not None:
            sys.stdout.write(tokenizer.decode(prompt))
        sys.stdout.flush()

    def add(self, token: int) -> None:
        self.tokens.append(token)
        if self.tokenizer is None:
            sys.stdout.write(f"{token} ")
        else:
            text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
            if not text.endswith("\ufffd"):
                sys.stdout.write(text[len(self.shown):])
                self.shown = text
        sys.stdout.flush()

    def finish(self) -> None:
        sys.stdout.write("\n")
        sys.stdout.flush()
