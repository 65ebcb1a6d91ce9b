"""The pack stage: one output shard — documents [s·S, (s+1)·S) of a split's packing order, copied from
the token shards into the packed-split format (megamoe/data/packed.py)."""

from __future__ import annotations

import numpy as np

from megamoe.config import DataConfig
from megamoe.data.packed import SplitWriter, token_dtype
from megamoe.data.sharded.layout import Layout, load_rows, shard_rows, stage_output
from megamoe.data.sharded.order import split_order
from megamoe.data.tokenizer import load_tokenizer


class TokenShards:
    """Random access to the tokens of one split's token shards, by position in sorted id order."""

    def __init__(self, layout: Layout, split: str, size: int, dtype: np.dtype):
        self.layout, self.split, self.size, self.dtype = layout, split, size, dtype
        self._open: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def document(self, position: int) -> np.ndarray:
        """The tokens (EOD last) of the document at this position of the sorted ids."""
        shard, row = divmod(position, self.size)
        if shard not in self._open:
            folder = self.layout.tokens(self.split, shard)
            offsets = np.concatenate([[0], np.cumsum(np.load(folder / "lengths.npy"))])
            self._open[shard] = (np.memmap(folder / "tokens.bin", dtype=self.dtype, mode="r"), offsets)
        tokens, offsets = self._open[shard]
        return np.asarray(tokens[offsets[row] : offsets[row + 1]])


def run_pack(cfg: DataConfig, layout: Layout, split: str, shard: int) -> None:
    """Write out/<split>/shard_NNNNN (nothing to do when it is there)."""
    final = layout.out(split, shard)
    final.parent.mkdir(parents=True, exist_ok=True)
    with stage_output(final) as out:
        if out is None:
            return
        order = split_order(cfg, layout, split)
        doc_ids = order[shard_rows(len(order), cfg.shard_documents, shard)]
        positions = np.searchsorted(load_rows(layout.plan, f"{split}_sorted"), doc_ids)
        domain_D = load_rows(layout.plan, "domain")
        dtype = token_dtype(load_tokenizer(layout.plan / "tokenizer.json").get_vocab_size())
        source = TokenShards(layout, split, cfg.shard_documents, dtype)
        writer = SplitWriter(out, dtype)
        for doc_id, position in zip(doc_ids.tolist(), positions.tolist()):
            writer.add_packed(source.document(position), int(domain_D[doc_id]), doc_id)
        writer.close()
