"""Fill the config values that depend on the data (the vocabulary size)."""

from __future__ import annotations

import copy

from megamoe.config.schema import Config
from megamoe.errors import ConfigError


def padded_vocab(tokenizer_vocab: int, multiple: int) -> int:
    """tokenizer_vocab rounded up to a multiple of `multiple`."""
    return -(-tokenizer_vocab // multiple) * multiple


def with_vocab(cfg: Config, tokenizer_vocab: int, source: str) -> Config:
    """A copy of cfg whose model.vocab_size holds every id of a tokenizer of tokenizer_vocab tokens."""
    out = copy.deepcopy(cfg)
    if cfg.model.vocab_size == 0:
        out.model.vocab_size = padded_vocab(tokenizer_vocab, cfg.model.vocab_multiple)
    elif cfg.model.vocab_size < tokenizer_vocab:
        raise ConfigError(
            "model.vocab_size",
            f"{cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
            f"({tokenizer_vocab} tokens, {source}); use 0 to size it from the tokenizer",
        )
    return out
