"""MegamoeConfig: a transformers config that carries megamoe's model and moe sections."""

from __future__ import annotations

from transformers import PretrainedConfig


class MegamoeConfig(PretrainedConfig):
    """megamoe's ModelConfig and MoEConfig (as dicts) plus the fields transformers tools read."""

    model_type = "megamoe"

    def __init__(self, megamoe_model: dict | None = None, megamoe_moe: dict | None = None, **kwargs):
        self.megamoe_model = dict(megamoe_model or {})
        self.megamoe_moe = dict(megamoe_moe or {})
        model = self.megamoe_model
        kwargs.setdefault("tie_word_embeddings", False)  # a tied megamoe head owns no weight to tie
        super().__init__(**kwargs)
        self.vocab_size = model.get("vocab_size", 0)
        self.hidden_size = model.get("d_model", 0)
        self.num_hidden_layers = model.get("num_layers", 0)
        self.num_attention_heads = model.get("num_heads", 0)
        self.num_key_value_heads = model.get("num_kv_heads") or self.num_attention_heads
        self.max_position_embeddings = model.get("seq_len", 0)
