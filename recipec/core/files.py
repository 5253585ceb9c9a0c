"""File names recipec agrees on across layers."""

# The tokenizer files a model directory may carry; source stages copy them, variants keep them.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
# Any one of these makes a directory's tokenizer loadable (special_tokens_map.json alone does not).
TOKENIZER_MODEL_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
# What a variant's graph takes from a tokenizer's output, declared in tokenizer_config.json: without it
# transformers 4.x's PreTrainedTokenizerFast also returns token_type_ids, and generate(**tokenizer(text))
# fails on them ("model_kwargs are not used: ['token_type_ids']").
MODEL_INPUT_NAMES = ("input_ids", "attention_mask")
