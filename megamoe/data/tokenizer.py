"""Byte-level BPE tokenizers: train one with HF `tokenizers`, or load a given tokenizer.json."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from megamoe.errors import DataError

EOD = "<|endoftext|>"
"""End-of-document token of trained tokenizers."""
EOD_CANDIDATES = (EOD, "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>")
"""End-of-document tokens recognised in a loaded tokenizer.json, first match wins."""


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE (no normalizer, so decoding round-trips every text exactly)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def load_tokenizer(path: str | Path, key: str = "data.tokenizer") -> Tokenizer:
    """A tokenizer.json from disk; errors name the config key and the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{key}: tokenizer file {path} not found")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on a bad file
        raise DataError(f"{key}: {path} is not a valid tokenizer.json ({err})") from None


def eod_id(tok: Tokenizer, where: str) -> int:
    """Id of the end-of-document token, or a clear error."""
    for token in EOD_CANDIDATES:
        idx = tok.token_to_id(token)
        if idx is not None:
            return idx
    raise DataError(f"{where}: the tokenizer has none of the end-of-document tokens {EOD_CANDIDATES}")
