"""Weight layouts: megamoe's parameter names and shapes ↔ the Llama-family names of transformers.

Shape legend: G key/value heads, Q query heads per group, K head width, D width, F FFN width,
E experts, V vocabulary. megamoe fuses the attention input projection as `attn.qkv.weight` laid
out group by group, rows [q_1..q_Q, k, v] of K each per key/value head (attention.py); transformers
keeps q_proj (H·K, D), k_proj (G·K, D), v_proj (G·K, D), where query head h uses key/value head
h // Q. Both use the rotate-half rotary convention, so no row permutation is needed. With
model.qkv_bias (Qwen2) the fused bias is laid out like the weight's rows.
"""

from __future__ import annotations

import torch

from megamoe.config import ModelConfig

DENSE_FFN = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
"""megamoe SwiGLU linear → transformers LlamaMLP linear."""


def split_qkv(qkv_WD: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """megamoe's fused qkv weight (or 1-D bias) → (q_proj, k_proj, v_proj) weights (or biases)."""
    if qkv_WD.ndim == 1:
        return tuple(t.squeeze(-1) for t in split_qkv(qkv_WD[:, None], cfg))
    groups, per_group, width = cfg.kv_heads, cfg.num_heads // cfg.kv_heads, cfg.head_dim
    qkv_GXKD = qkv_WD.view(groups, per_group + 2, width, -1)
    q = qkv_GXKD[:, :per_group].reshape(groups * per_group * width, -1)
    k = qkv_GXKD[:, per_group].reshape(groups * width, -1)
    v = qkv_GXKD[:, per_group + 1].reshape(groups * width, -1)
    return q.contiguous(), k.contiguous(), v.contiguous()


def fuse_qkv(q_HD: torch.Tensor, k_GD: torch.Tensor, v_GD: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """(q_proj, k_proj, v_proj) weights (or biases) → megamoe's fused qkv weight (or bias); inverse of split_qkv."""
    if q_HD.ndim == 1:
        return fuse_qkv(q_HD[:, None], k_GD[:, None], v_GD[:, None], cfg).squeeze(-1)
    groups, per_group, width = cfg.kv_heads, cfg.num_heads // cfg.kv_heads, cfg.head_dim
    dim = q_HD.shape[-1]
    q_GQKD = q_HD.reshape(groups, per_group, width, dim)
    k_G1KD, v_G1KD = k_GD.reshape(groups, 1, width, dim), v_GD.reshape(groups, 1, width, dim)
    return torch.cat([q_GQKD, k_G1KD, v_G1KD], 1).reshape(-1, dim).contiguous()


def dense_to_llama(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The attention, norms, embeddings and dense FFNs of a megamoe state dict under LlamaForCausalLM's names.

    MoE FFN parameters (`layers.i.ffn.<scorer|experts|shared|dense>...`) are left out: the caller maps them.
    """
    out = {"model.embed_tokens.weight": state["embed.weight"], "model.norm.weight": state["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    for i in range(cfg.num_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        q, k, v = split_qkv(state[src + "attn.qkv.weight"], cfg)
        if cfg.qkv_bias:
            q_b, k_b, v_b = split_qkv(state[src + "attn.qkv.bias"], cfg)
            out |= {f"{dst}self_attn.{p}_proj.bias": b for p, b in zip("qkv", (q_b, k_b, v_b))}
        out |= {dst + "self_attn.q_proj.weight": q, dst + "self_attn.k_proj.weight": k,
                dst + "self_attn.v_proj.weight": v, dst + "self_attn.o_proj.weight": state[src + "attn.proj.weight"],
                dst + "input_layernorm.weight": state[src + "attn_norm.weight"],
                dst + "post_attention_layernorm.weight": state[src + "ffn_norm.weight"]}  # fmt: skip
        for ours, theirs in DENSE_FFN.items():
            name = f"{src}ffn.{ours}.weight"
            if name in state:
                out[f"{dst}mlp.{theirs}.weight"] = state[name]
    return out


def llama_to_dense(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A LlamaForCausalLM-named state dict (dense) → megamoe's names (inverse of dense_to_llama)."""
    out = {"embed.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = hf["lm_head.weight"]
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        attn = [hf[f"{src}self_attn.{p}_proj.weight"] for p in "qkv"]
        if cfg.qkv_bias:
            out[dst + "attn.qkv.bias"] = fuse_qkv(*[hf[f"{src}self_attn.{p}_proj.bias"] for p in "qkv"], cfg)
        out |= {dst + "attn.qkv.weight": fuse_qkv(*attn, cfg),
                dst + "attn.proj.weight": hf[src + "self_attn.o_proj.weight"],
                dst + "attn_norm.weight": hf[src + "input_layernorm.weight"],
                dst + "ffn_norm.weight": hf[src + "post_attention_layernorm.weight"]}  # fmt: skip
        for ours, theirs in DENSE_FFN.items():
            out[f"{dst}ffn.{ours}.weight"] = hf[f"{src}mlp.{theirs}.weight"]
    return out
