"""Text corpora for the offline reference model: file sets, train/eval splits, a BPE tokenizer, token windows.

A corpus spec is either the string "stdlib" (the Python standard library's own source, present wherever
Python is) or a mapping {"text": "<glob>"} naming the user's files, relative to the recipe's directory.

Each file is one document. A file's split depends only on the sha256 of its path relative to the corpus
root, so splits are disjoint, stable across machines and runs, and adding a file never moves another one.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from recipec.core.files import MODEL_INPUT_NAMES
from recipec.errors import PassError

Split = Literal["train", "eval"]
SPLITS = ("train", "eval")
EVAL_PERCENT = 5
EOS_TOKEN = "<|endoftext|>"

# Parts of the stdlib tree that are not hand-written library source. Tests are left out because they are
# a third of the tree and mostly fixture strings; `encodings` is generated charmap tables (4 MB of
# near-identical lines that would flatter perplexity); `pydoc_data` is one generated 750 KB blob of
# documentation prose; `site-packages`/`dist-packages` are whatever happens to be installed; `config-*`
# holds build files.
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test",
                               "__pycache__", "encodings", "pydoc_data"})
# _sysconfigdata_* records the build machine's compiler flags and paths: it differs between installs of
# the same Python version and would make the corpus fingerprint machine-specific.
_STDLIB_SKIP_FILE_PREFIXES = ("_sysconfigdata",)


def _spec_kind(spec: Any) -> str:
    if spec == "stdlib":
        return "stdlib"
    if isinstance(spec, dict) and set(spec) == {"text"} and isinstance(spec["text"], str) and spec["text"]:
        return "text"
    raise PassError(f"corpus must be \"stdlib\" or {{text: \"<glob>\"}}, got {spec!r}")


def _stdlib_files() -> tuple[Path, list[str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    rels = []
    # os.walk (not rglob) so that symlinked directories are not followed: the set must not depend on them.
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith("config-")]
        for name in filenames:
            if name.endswith(".py") and not name.startswith(_STDLIB_SKIP_FILE_PREFIXES):
                rels.append(Path(dirpath, name).relative_to(root).as_posix())
    return root, sorted(rels)


def _glob_root(pattern: Path) -> Path:
    """The longest leading part of a pattern without wildcards: paths are made relative to it so that the
    split and fingerprint do not change when the whole corpus directory moves."""
    parts = []
    for part in pattern.parts:
        if glob.has_magic(part):
            break
        parts.append(part)
    root = Path(*parts) if parts else Path(".")
    return root if root.is_dir() else root.parent


def text_files(pattern: str, base_dir: Path) -> tuple[Path, list[str]]:
    full = Path(base_dir, os.path.expanduser(pattern))
    matches = [Path(p) for p in glob.glob(str(full), recursive=True)]
    files = [p for p in matches if p.is_file()]
    if not files:
        hint = f"; for a directory's files write {pattern.rstrip('/')}/**/*" if full.is_dir() else ""
        raise PassError(f"corpus text glob {pattern!r} matches no files (searched relative to {base_dir}){hint}")
    root = _glob_root(full)
    return root, sorted({p.relative_to(root).as_posix() for p in files})


def _all_files(spec: Any, base_dir: Path) -> tuple[Path, list[str]]:
    if _spec_kind(spec) == "stdlib":
        return _stdlib_files()
    return text_files(spec["text"], Path(base_dir))


def _hash_percent(rel: str) -> int:
    return int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big") % 100


def split_disjoint(keys: list[str], what: str = "files") -> dict[str, list[str]]:
    """Train and eval by a hash of each key (a file's relative path, a record's text): stable, disjoint (equal
    keys land on the same side), and each side non-empty."""
    distinct = sorted(set(keys))
    if len(distinct) < 2:
        raise PassError(f"a corpus needs at least 2 {what} to form disjoint train and eval splits, got "
                        f"{len(distinct)}")
    eval_set = {k for k in distinct if _hash_percent(k) < EVAL_PERCENT}
    if not eval_set:
        # Small corpora can hash entirely into train; the key with the lowest hash keeps eval non-empty.
        eval_set = {min(distinct, key=lambda k: (_hash_percent(k), k))}
    if len(eval_set) == len(distinct):
        eval_set.discard(max(eval_set))
    return {"train": [k for k in keys if k not in eval_set], "eval": [k for k in keys if k in eval_set]}


def resolve_files(spec: Any, split: Split, base_dir: Path) -> list[Path]:
    """The files of one split, in sorted order of their relative paths."""
    if split not in SPLITS:
        raise PassError(f"split must be one of {SPLITS}, got {split!r}")
    root, rels = _all_files(spec, base_dir)
    return [root / r for r in split_disjoint(rels)[split]]


def file_counts(spec: Any, base_dir: Path) -> dict[str, int]:
    _, rels = _all_files(spec, base_dir)
    return {split: len(files) for split, files in split_disjoint(rels).items()}


def corpus_fingerprint(spec: Any, base_dir: Path) -> str:
    """sha256 over every file's relative path and bytes: editing, adding or removing a file changes it."""
    root, rels = _all_files(spec, base_dir)
    h = hashlib.sha256(_spec_kind(spec).encode())
    for rel in rels:
        data = (root / rel).read_bytes()
        h.update(f"\0{rel}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def read_texts(files: list[Path]) -> list[str]:
    # errors="replace": a stray non-UTF-8 byte in a user's file should cost one character, not the build.
    return [f.read_bytes().decode("utf-8", errors="replace") for f in files]


def train_tokenizer(spec: Any, vocab_size: int, base_dir: Path, out_dir: Path, model_max_length: int | None = None):
    """Train a byte-level BPE tokenizer on the train split and save it as HF fast-tokenizer files.

    Returns the `transformers.PreTrainedTokenizerFast`. Byte-level means every input is encodable (no
    unknown token), which matters because eval text may contain characters train text lacks.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257 + 1:
        raise PassError(f"vocab_size must be at least 258 (256 bytes + {EOS_TOKEN} + 1 merge), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(read_texts(resolve_files(spec, "train", base_dir)), trainer=trainer)
    return _save_fast_tokenizer(tok, Path(out_dir), model_max_length)


def _save_fast_tokenizer(tok, out_dir: Path, model_max_length: int | None):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN,
                                   pad_token=EOS_TOKEN, unk_token=None, clean_up_tokenization_spaces=False)
    if model_max_length is not None:
        fast.model_max_length = model_max_length
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    _write_compatible_config(out_dir)
    return fast


def _write_compatible_config(out_dir: Path) -> None:
    """Make the saved files loadable by transformers 4.x too (pyproject allows >= 4.56)."""
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    # transformers 5 writes its own class name "TokenizersBackend", which 4.x cannot resolve.
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["model_input_names"] = list(MODEL_INPUT_NAMES)
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    special = out_dir / "special_tokens_map.json"
    if not special.exists():
        # transformers 5 stopped writing this file; 4.x and onnxruntime-genai read it.
        special.write_text(json.dumps({"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN},
                                      indent=2) + "\n")


def _backend(tokenizer):
    """The `tokenizers.Tokenizer` inside a HF fast tokenizer (or the object itself), and its eos id."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if not hasattr(backend, "encode_batch"):
        raise PassError(f"token_windows needs a fast (Rust) tokenizer, got {type(tokenizer).__name__}")
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        eos = backend.token_to_id(EOS_TOKEN)
    if eos is None:
        raise PassError(f"the tokenizer has no eos token (and no {EOS_TOKEN!r}) to separate documents")
    return backend, int(eos)


# Tokenizing the stdlib train split takes seconds; calibration and eval ask for the same stream repeatedly.
_STREAMS: dict[str, np.ndarray] = {}


def token_stream(tokenizer, spec: Any, split: Split, base_dir: Path, cache_dir: Path | None = None) -> np.ndarray:
    """All files of a split tokenized and concatenated, each followed by eos (int32, read-only).

    Cached in memory by (tokenizer, corpus contents, split), and on disk under cache_dir when given.
    """
    backend, eos = _backend(tokenizer)
    key = hashlib.sha256("\0".join([hashlib.sha256(backend.to_str().encode()).hexdigest(),
                                    corpus_fingerprint(spec, base_dir), split]).encode()).hexdigest()[:32]
    if key in _STREAMS:
        return _STREAMS[key]
    path = Path(cache_dir, f"tokens-{key}.npy") if cache_dir is not None else None
    if path is not None and path.exists():
        stream = np.load(path)
    else:
        stream = _tokenize(backend, eos, resolve_files(spec, split, base_dir))
        if path is not None:
            _save_atomic(path, stream)
    stream.setflags(write=False)
    _STREAMS[key] = stream
    return stream


def _tokenize(backend, eos: int, files: list[Path]) -> np.ndarray:
    encodings = backend.encode_batch(read_texts(files), add_special_tokens=False)
    pieces = []
    for enc in encodings:
        pieces.append(np.asarray(enc.ids, dtype=np.int32))
        pieces.append(np.asarray([eos], dtype=np.int32))
    return np.concatenate(pieces)


def _save_atomic(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)  # concurrent builds may race: the loser's identical file replaces the winner's


def token_windows(tokenizer, spec: Any, split: Split, samples: int, seq_len: int, seed: int, base_dir: Path) -> torch.Tensor:
    """`samples` distinct, non-overlapping windows of `seq_len` tokens from a split: int64 [samples, seq_len].

    Windows are aligned to multiples of seq_len in the split's token stream and drawn without replacement
    by a generator seeded with `seed`, so the same arguments give the same tensor on any machine.
    """
    if samples < 1 or seq_len < 2:
        raise PassError(f"token windows need samples >= 1 and seq_len >= 2, got {samples} and {seq_len}")
    stream = token_stream(tokenizer, spec, split, base_dir)
    available = len(stream) // seq_len
    if samples > available:
        raise PassError(f"the {split} split has {len(stream)} tokens: only {available} windows of {seq_len} "
                        f"tokens, {samples} requested; lower samples or seq_len, or add text")
    order = torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:samples]
    starts = order.numpy() * seq_len
    return torch.from_numpy(np.stack([stream[s:s + seq_len] for s in starts]).astype(np.int64))
