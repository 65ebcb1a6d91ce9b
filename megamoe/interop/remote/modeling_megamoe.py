"""MegamoeForCausalLM: any megamoe model (every routing family) as a transformers causal LM.

Shape legend: B batch, L sequence, V vocabulary. The forward is megamoe's own Transformer in eval
mode; generation keeps megamoe's DecodeCache (keys/values and Lory's prompt or segment routing)
between steps, so `generate()` equals `megamoe generate`. Padded batches are not supported: the
model has no attention mask (a mask with zeros is refused).
"""

from __future__ import annotations

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from megamoe.config import ModelConfig, MoEConfig
from megamoe.model.layers import Rotary
from megamoe.model.moe.state import DecodeCache
from megamoe.model.transformer import Transformer

from .configuration_megamoe import MegamoeConfig


class MegamoeForCausalLM(PreTrainedModel, GenerationMixin):
    """A megamoe Transformer under `self.model`, with logits, loss and cached generation."""

    config_class = MegamoeConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ("Block",)

    def __init__(self, config: MegamoeConfig):
        super().__init__(config)
        self.model = Transformer(ModelConfig(**config.megamoe_model), moe=MoEConfig(**config.megamoe_moe))
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """The cache is megamoe's own DecodeCache, made by forward."""
        return False

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Weights come from the checkpoint; only rotary tables (buffers, not saved) are rebuilt."""
        if isinstance(module, Rotary):
            cfg = self.model.cfg
            fresh = Rotary(cfg.head_dim, cfg.seq_len, cfg.rope_theta)
            module.cos_LK, module.sin_LK = fresh.cos_LK.to(module.cos_LK.device), fresh.sin_LK.to(module.sin_LK.device)

    def get_input_embeddings(self) -> torch.nn.Module:
        """The token embedding."""
        return self.model.embed

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        cache: DecodeCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits (B, L, V); loss when labels are given (shifted inside, -100 ignored); cache when use_cache."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("megamoe models have no attention mask: pass unpadded sequences of equal length")
        if use_cache and cache is None:
            cache = DecodeCache()
        done = cache.length if cache is not None else 0
        if done + input_ids.shape[1] > self.model.cfg.seq_len:
            raise ValueError(
                f"{done + input_ids.shape[1]} tokens exceed the model's context ({self.model.cfg.seq_len})"
            )
        logits_BLV = self.model(input_ids, cache=cache).logits_BLV.float()
        loss = None
        if labels is not None:
            shift_BL = labels[:, 1:].to(logits_BLV.device)
            loss = torch.nn.functional.cross_entropy(logits_BLV[:, :-1].flatten(0, 1), shift_BL.flatten())
        return CausalLMOutputWithPast(loss=loss, logits=logits_BLV, cache=cache if use_cache else None)

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, cache: DecodeCache | None = None, **kwargs):
        """Only the tokens the cache has not seen yet (the whole prompt first, then one at a time)."""
        done = cache.length if cache is not None else 0
        mask = kwargs.get("attention_mask")
        return {"input_ids": input_ids[:, done:], "cache": cache, "attention_mask": mask, "use_cache": True}
