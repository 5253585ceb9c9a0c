"""File names recipec agrees on across layers."""

# The tokenizer files a model directory may carry; source stages copy them, variants keep them.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
# Any one of these makes a directory's tokenizer loadable (special_tokens_map.json alone does not).
TOKENIZER_MODEL_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
