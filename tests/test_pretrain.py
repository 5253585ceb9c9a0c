"""The offline reference model: corpus splits, tokenizer, token windows, and a reproducible tiny pretrain."""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import jsonschema
import pytest
import torch

from recipec.source import corpus, pretrain
from recipec.passes.base import PassError

TINY_LLAMA = {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128, "num_attention_heads": 2,
              "num_key_value_heads": 1}
TINY_SPEC = {"corpus": {"text": "src/**/*.py"}, "steps": 30, "warmup_steps": 3, "batch_size": 4, "seq_len": 64,
             "vocab_size": 400, "eval_samples": 8, "learning_rate": 0.01}


@contextlib.contextmanager
def _progress(description, total):
    yield lambda n, **fields: None


@pytest.fixture(scope="module")
def text_root(tmp_path_factory) -> Path:
    """Real text for a small corpus: 60 small stdlib modules copied into src/, two directories deep."""
    root = tmp_path_factory.mktemp("corpus")
    small = [f for f in corpus.resolve_files("stdlib", "train", Path(".")) if 2_000 < f.stat().st_size < 15_000]
    assert len(small) >= 60
    for i, f in enumerate(small[:60]):
        dest = root / "src" / f"pkg{i % 3}" / f"m{i:02d}.py"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dest)
    return root


@pytest.fixture(scope="module")
def tokenizer_dir(text_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    corpus.train_tokenizer(TINY_SPEC["corpus"], 400, text_root, out)
    return out


def test_stdlib_splits_are_disjoint_deterministic_and_source_only():
    train = corpus.resolve_files("stdlib", "train", Path("."))
    evals = corpus.resolve_files("stdlib", "eval", Path("."))
    assert not set(train) & set(evals)
    assert 0.01 < len(evals) / (len(train) + len(evals)) < 0.15
    assert corpus.resolve_files("stdlib", "eval", Path("/")) == evals  # base_dir plays no part for stdlib
    for f in train + evals:
        assert f.suffix == ".py"
        assert not {"site-packages", "test", "tests", "encodings"} & set(f.parts)


def test_adding_a_file_moves_no_other_file(text_root, tmp_path):
    shutil.copytree(text_root / "src", tmp_path / "src")
    spec = {"text": "src/**/*.py"}
    before = {split: corpus.resolve_files(spec, split, tmp_path) for split in corpus.SPLITS}
    (tmp_path / "src" / "new.py").write_text("x = 1\n")
    after = {split: corpus.resolve_files(spec, split, tmp_path) for split in corpus.SPLITS}
    for split in corpus.SPLITS:
        assert set(before[split]) <= set(after[split])
    assert before["eval"], "60 files must give a non-empty eval split"


def test_text_glob_corpus_fingerprint_tracks_content_not_location(text_root, tmp_path):
    spec = {"text": "data/**/*.py"}
    shutil.copytree(text_root / "src", tmp_path / "a" / "data")
    shutil.copytree(text_root / "src", tmp_path / "b" / "data")
    first = corpus.corpus_fingerprint(spec, tmp_path / "a")
    assert corpus.corpus_fingerprint(spec, tmp_path / "b") == first
    edited = sorted((tmp_path / "b" / "data").rglob("*.py"))[5]
    edited.write_text(edited.read_text() + "\n# edited\n")
    assert corpus.corpus_fingerprint(spec, tmp_path / "b") != first
    assert corpus.file_counts(spec, tmp_path / "a") == {"train": len(corpus.resolve_files(spec, "train", tmp_path / "a")),
                                                         "eval": len(corpus.resolve_files(spec, "eval", tmp_path / "a"))}


def test_glob_matching_nothing_is_a_clear_error(tmp_path):
    with pytest.raises(PassError, match=r"'nowhere/\*\.txt' matches no files"):
        corpus.resolve_files({"text": "nowhere/*.txt"}, "train", tmp_path)
    with pytest.raises(PassError, match="at least 2 files"):
        (tmp_path / "only.txt").write_text("one document")
        corpus.resolve_files({"text": "*.txt"}, "train", tmp_path)
    with pytest.raises(PassError, match="corpus must be"):
        corpus.resolve_files({"txt": "*.txt"}, "train", tmp_path)


def test_tokenizer_is_deterministic_round_trips_and_loads_with_autotokenizer(text_root, tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    corpus.train_tokenizer(TINY_SPEC["corpus"], 400, text_root, tmp_path)
    assert (tmp_path / "tokenizer.json").read_bytes() == (tokenizer_dir / "tokenizer.json").read_bytes()
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= {p.name for p in tmp_path.iterdir()}
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert tok.eos_token == tok.pad_token == tok.bos_token == corpus.EOS_TOKEN
    assert len(tok) == 400
    text = "def naïve(x):\n\treturn {'ключ': x}  # 🙂 never seen in training\n"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.eos_token_id not in ids  # no special tokens added: documents are joined by explicit eos


def test_token_windows_are_seeded_real_text(text_root, tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    spec = TINY_SPEC["corpus"]
    a = corpus.token_windows(tok, spec, "train", 8, 32, 0, text_root)
    assert a.dtype == torch.int64 and a.shape == (8, 32)
    assert torch.equal(a, corpus.token_windows(tok, spec, "train", 8, 32, 0, text_root))
    assert not torch.equal(a, corpus.token_windows(tok, spec, "train", 8, 32, 1, text_root))
    assert len({tuple(w) for w in a.tolist()}) == 8
    train_text = "".join(f.read_text() for f in corpus.resolve_files(spec, "train", text_root))
    decoded = tok.decode(a[0]).split(corpus.EOS_TOKEN)
    assert max(decoded, key=len) in train_text
    with pytest.raises(PassError, match="windows"):
        corpus.token_windows(tok, spec, "eval", 10**6, 32, 0, text_root)


def test_token_stream_disk_cache_reloads_the_same_tokens(text_root, tokenizer_dir, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    monkeypatch.setattr(corpus, "_STREAMS", {})
    first = corpus.token_stream(tok, TINY_SPEC["corpus"], "eval", text_root, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("tokens-*.npy"))) == 1
    monkeypatch.setattr(corpus, "_STREAMS", {})
    monkeypatch.setattr(corpus, "_tokenize", lambda *a: pytest.fail("re-tokenized despite the disk cache"))
    assert (corpus.token_stream(tok, TINY_SPEC["corpus"], "eval", text_root, cache_dir=tmp_path) == first).all()


def _run(text_root: Path, out: Path) -> dict:
    logs = []
    metrics = pretrain.pretrain("llama", TINY_LLAMA, 0, TINY_SPEC, text_root, out, _progress, logs.append)
    assert any("perplexity" in line for line in logs)
    return metrics


@pytest.fixture
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a busy machine waiting threads cost seconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_tiny_pretrain_is_byte_identical_and_learns(text_root, tmp_path, one_thread):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    first, second = _run(text_root, tmp_path / "a"), _run(text_root, tmp_path / "b")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert first["eval_loss"] == second["eval_loss"]
    assert first["train_loss"] < first["initial_train_loss"] - 0.5
    assert first["eval_perplexity"] < first["vocab_size"] / 2  # an untrained model sits near vocab_size
    assert first["tokens_seen"] == 30 * 4 * 64 and first["train_files"] + first["eval_files"] == 60
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    tok = AutoTokenizer.from_pretrained(tmp_path / "a")
    assert model.config.vocab_size == len(tok) and model.config.eos_token_id == tok.eos_token_id
    assert json.loads((tmp_path / "a" / "generation_config.json").read_text())["pad_token_id"] == tok.pad_token_id


def test_config_overrides_are_checked():
    spec = pretrain.resolve_spec({})
    with pytest.raises(PassError, match="did you mean 'hidden_size'"):
        pretrain.pretrain_problems("llama", {"hidden_szie": 64}, spec)
    assert pretrain.pretrain_problems("llama", {"vocab_size": 100}, spec) == [
        (("config", "vocab_size"), "vocab_size is set by the trained tokenizer; use pretrain.vocab_size")]
    with pytest.raises(PassError, match="unknown model family"):
        pretrain.pretrain_problems("no_such_family", {}, spec)
    assert pretrain.pretrain_problems("llama", {"hidden_size": 64}, spec) == []
    with pytest.raises(PassError, match="exceeds the model's max_position_embeddings 32"):
        pretrain.pretrain("llama", {"max_position_embeddings": 32}, 0, {"seq_len": 64}, Path("."), Path("unused"),
                          _progress, print)


def test_schema_is_valid_and_its_defaults_validate():
    jsonschema.Draft202012Validator.check_schema(pretrain.PRETRAIN_SCHEMA)
    for name, prop in pretrain.PRETRAIN_SCHEMA["properties"].items():
        assert "default" in prop and prop["description"], name
    defaults = pretrain.resolve_spec({})
    jsonschema.validate(defaults, pretrain.PRETRAIN_SCHEMA)
    jsonschema.validate(TINY_SPEC, pretrain.PRETRAIN_SCHEMA)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"corpus": "stdlb"}, pretrain.PRETRAIN_SCHEMA)
    with pytest.raises(PassError, match="'stepz' was unexpected"):
        pretrain.resolve_spec({"stepz": 3})
    assert pretrain.pretrain_problems("llama", {}, pretrain.resolve_spec({"steps": 10, "warmup_steps": 10})) == [
        (("pretrain", "warmup_steps"), "warmup_steps (10) must be fewer than steps (10)")]


def test_learning_rate_warms_up_then_decays_to_the_floor():
    spec = pretrain.resolve_spec({"steps": 100, "warmup_steps": 10, "min_lr_ratio": 0.1})
    factors = [pretrain.lr_factor(s, spec) for s in range(100)]
    assert factors[:10] == sorted(factors[:10]) and factors[9] == 1.0
    assert factors[10:] == sorted(factors[10:], reverse=True)
    assert factors[-1] == pytest.approx(0.1)


def test_jsonl_calibration_and_eval_records_are_disjoint(tmp_path):
    """Calibration (which distillation trains on) and eval draw from disjoint records of one jsonl file."""
    import random

    from conftest import make_tiny_model

    from recipec.source.data import RecipeData, jsonl_split

    rng = random.Random(0)
    texts = [" ".join(f"w{rng.randrange(3, 256)}" for _ in range(12)) for _ in range(200)]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in texts + texts[:10]) + "\n")  # duplicates included
    split = jsonl_split(path, "text")
    assert split["train"] and split["eval"] and not set(split["train"]) & set(split["eval"])
    assert set(split["train"]) | set(split["eval"]) == set(texts)

    make_tiny_model("llama", tmp_path / "model", tokenizer=True)
    section = {"source": "jsonl", "path": "data.jsonl", "field": "text", "samples": 16, "seq_len": 8, "seed": 0}
    data = RecipeData({"calibration": section, "eval": {**section, "seed": 1}}, tmp_path / "model", tmp_path)

    def stream(records: list[str]) -> str:  # the split's token stream as text, records joined by EOS as the reader does
        eos = data.tokenizer.eos_token_id
        return " " + " ".join(" ".join(map(str, data.tokenizer(t)["input_ids"] + [eos])) for t in records) + " "

    def inside(row, text: str) -> bool:
        return f" {' '.join(map(str, row.tolist()))} " in text

    train, held_out = stream(split["train"]), stream(split["eval"])
    assert all(inside(row, held_out) and not inside(row, train) for row in data.eval())
    assert all(inside(row, train) and not inside(row, held_out) for row in data.calibration())
