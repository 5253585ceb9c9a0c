"""A variant's tokenizer returns only what its graph takes: tokenizer_config.json names model_input_names, so
transformers 4.x (the versions Optimum pins) returns no token_type_ids and generate(**tokenizer(text)) works.
transformers 5 stopped returning them by default, so the check runs in a transformers 4.57 environment."""
from __future__ import annotations

import json

import pytest
from peer_envs import peer_python, run_python
from tokenizers import Tokenizer, models, pre_tokenizers

from recipec.onnx import artifact
from recipec.source import corpus

KEYS = """
import json, sys
from transformers import AutoTokenizer
print(json.dumps({d: sorted(AutoTokenizer.from_pretrained(d)("w5 w6").keys()) for d in sys.argv[1:]}))
"""


def word_level() -> Tokenizer:
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "w5": 5, "w6": 6}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def users_tokenizer(directory):
    """What a user's model may carry: a fast tokenizer whose config names no model_input_names."""
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=word_level(), unk_token="<unk>").save_pretrained(directory)
    path = directory / "tokenizer_config.json"
    config = {**json.loads(path.read_text()), "tokenizer_class": "PreTrainedTokenizerFast"}  # 4.x reads this name
    config.pop("model_input_names", None)
    path.write_text(json.dumps(config))
    return directory


def test_variants_and_recipec_tokenizers_return_no_token_type_ids(tmp_path):
    python = peer_python("transformers-4.57")
    user = users_tokenizer(tmp_path / "user")
    variant = tmp_path / "variant"
    variant.mkdir()
    assert "tokenizer_config.json" in artifact.copy_support_files(user, variant)
    ours = tmp_path / "trained"
    corpus._save_fast_tokenizer(word_level(), ours, None)
    keys = run_python(python, ["-c", KEYS, str(user), str(variant), str(ours)])
    assert keys[str(user)] == ["attention_mask", "input_ids", "token_type_ids"]  # what Optimum's generate refuses
    assert keys[str(variant)] == keys[str(ours)] == ["attention_mask", "input_ids"]
