"""`recipec run`: generate from a built variant, streaming the text, then the call's TTFT and TPOT."""
from __future__ import annotations

import sys
from pathlib import Path

from . import console


def run_prompt(args) -> int:
    from . import runtime
    from .cli import EXIT_OK, UsageError

    console.quiet_libraries()
    variant_dir = _variant_dir(args.build_dir, args.variant)
    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be at least 1")
    lm = runtime.load(variant_dir, device=args.device)
    tokenizer = runtime.tokenizer(variant_dir)
    prompt = _prompt_ids(args.prompt, tokenizer, UsageError)
    stream = _Stream(tokenizer, prompt)
    result = lm.generate([prompt], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, seed=args.seed, on_token=lambda _seq, token, _t: stream.add(token))
    stream.finish()
    tpot = result.tpot(0)
    console.say(f"{len(result.tokens[0])} tokens ({result.finish_reasons[0]}) on {lm.device}: "
                f"TTFT {result.ttft(0) * 1000:.1f} ms, TPOT {'n/a' if tpot is None else f'{tpot * 1000:.2f} ms'} "
                "(wall clock of this call at batch 1, model loading excluded)")
    return EXIT_OK


def _variant_dir(build_dir: Path, variant: str) -> Path:
    from .cli import UsageError

    variants = build_dir / "variants"
    if not variants.is_dir():
        raise UsageError(f"{build_dir} is not a recipec build directory (no variants/)")
    target = variants / variant
    if not (target / "model.onnx").is_file():
        known = sorted(p.name for p in variants.iterdir() if (p / "model.onnx").is_file())
        raise UsageError(f"no variant {variant!r} in {build_dir} (variants: {', '.join(known)})")
    return target


def _prompt_ids(prompt: str, tokenizer, usage_error) -> list[int]:
    if tokenizer is not None:
        ids = tokenizer(prompt)["input_ids"]
    else:
        try:
            ids = [int(t) for t in prompt.replace(",", " ").split()]
        except ValueError:
            raise usage_error("this model has no tokenizer: give the prompt as token ids, e.g. --prompt '1 5 9'") from None
    if not ids:
        raise usage_error("the prompt is empty")
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
