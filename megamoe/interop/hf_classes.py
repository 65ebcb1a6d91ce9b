"""Which transformers class computes exactly what a megamoe model computes, and its config and weights.

Shape legend: E experts, F expert FFN width, D width. In evaluation every family is dropless here
(transformers' MoE classes drop nothing), and the exported function is megamoe's eval-mode one:

* dense → LlamaForCausalLM (Qwen2ForCausalLM with model.qkv_bias);
* token choice (and expert choice's causal fallback, which is token choice) with a linear router
  and softmax scores: renormalized, every block MoE, no shared or residual FFN → MixtralForCausalLM;
  otherwise → Qwen2MoeForCausalLM (decoder_sparse_step = moe.moe_every, norm_topk_prob =
  moe.renormalize, qkv_bias = model.qkv_bias). Qwen2-MoE gates its shared expert by sigmoid(g·x): g = 0 gives
  exactly 1/2, and the shared down projection is doubled (both exact powers of two), so shared
  experts and OpenMoE's residual FFN (concatenated along F into one SwiGLU) are added ungated;
* everything else (Lory, GRIN's SparseMixer-v2, RMoE's GRU router, sigmoid scores) → megamoe's own
  MegamoeForCausalLM, loaded with trust_remote_code=True.
OLMoE and Qwen3-MoE normalize queries and keys (QK-norm), which megamoe does not: never a match.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megamoe.config import ModelConfig, MoEConfig
from megamoe.interop.layout import dense_to_llama


@dataclass(frozen=True)
class Target:
    """The class an export is written as, and why."""

    kind: str
    """llama, qwen2, mixtral, qwen2_moe or megamoe (the remote-code wrapper)."""
    why: str
    """One sentence for the command's output."""


def choose_target(model: ModelConfig, moe: MoEConfig) -> Target:
    """The native class whose math matches the model exactly, else the wrapper (with the reason)."""
    if not moe.enabled:
        if model.qkv_bias:
            return Target("qwen2", "a dense megamoe model with q/k/v biases is a Qwen2 model")
        return Target("llama", "a dense megamoe model is a Llama model")
    if moe.routing not in ("topk", "expert_choice"):  # expert choice evaluates as causal token choice
        return Target("megamoe", f"moe.routing={moe.routing} has no transformers class")
    if moe.scorer != "linear":
        return Target("megamoe", "RMoE's GRU router has no transformers class")
    if moe.score_fn != "softmax":
        return Target("megamoe", "sigmoid router scores have no transformers class")
    if moe.balance == "aux_free" or moe.num_groups > 1 or moe.routed_scaling != 1.0:
        return Target("megamoe", "Mixtral and Qwen2-MoE have no expert bias, group-limited routing or routed scaling")
    plain = moe.moe_every == 1 and not moe.num_shared_experts and not moe.residual
    if moe.renormalize and plain and eval_top_k(moe) > 1 and not model.qkv_bias:
        return Target("mixtral", "renormalized softmax top-k in every block is Mixtral")
    return Target("qwen2_moe", "softmax top-k with MoE every k blocks, shared or residual FFN is Qwen2-MoE")


def eval_top_k(moe: MoEConfig) -> int:
    """Experts per token in evaluation (expert choice falls back to token choice with this k)."""
    if moe.routing == "expert_choice":
        return min(moe.eval_top_k or max(1, round(moe.capacity_factor)), moe.num_experts)
    return moe.top_k


def hf_config(model: ModelConfig, moe: MoEConfig, target: Target, eos_id: int | None):
    """The transformers config of the target class."""
    import transformers

    common = dict(
        vocab_size=model.vocab_size, hidden_size=model.d_model, num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_heads, num_key_value_heads=model.kv_heads, head_dim=model.head_dim,
        max_position_embeddings=model.seq_len, rms_norm_eps=model.norm_eps, hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": model.rope_theta},
        tie_word_embeddings=model.tie_embeddings, bos_token_id=None, eos_token_id=eos_id, pad_token_id=None,
        initializer_range=model.init_std, use_cache=True,
    )  # fmt: skip
    expert_hidden = moe.expert_hidden_size or model.ffn_hidden
    if target.kind == "llama":
        return transformers.LlamaConfig(
            **common, intermediate_size=model.ffn_hidden, attention_bias=False, mlp_bias=False
        )
    if target.kind == "qwen2":
        return transformers.Qwen2Config(**common, intermediate_size=model.ffn_hidden, use_sliding_window=False)
    if target.kind == "mixtral":
        return transformers.MixtralConfig(
            **common, intermediate_size=expert_hidden, num_local_experts=moe.num_experts,
            num_experts_per_tok=moe.top_k, router_jitter_noise=0.0, sliding_window=None,
        )  # fmt: skip
    return transformers.Qwen2MoeConfig(
        **common, intermediate_size=model.ffn_hidden, moe_intermediate_size=expert_hidden,
        shared_expert_intermediate_size=shared_width(model, moe), num_experts=moe.num_experts,
        num_experts_per_tok=eval_top_k(moe), norm_topk_prob=moe.renormalize, decoder_sparse_step=moe.moe_every,
        mlp_only_layers=[], qkv_bias=model.qkv_bias, use_sliding_window=False, sliding_window=None,
    )  # fmt: skip


def shared_width(model: ModelConfig, moe: MoEConfig) -> int:
    """Qwen2-MoE's shared-expert width: megamoe's shared experts and residual FFN side by side."""
    expert_hidden = moe.expert_hidden_size or model.ffn_hidden
    return expert_hidden * moe.num_shared_experts + (model.ffn_hidden if moe.residual else 0)


def hf_state(state: dict[str, torch.Tensor], model: ModelConfig, moe: MoEConfig, target: Target) -> dict:
    """megamoe's state dict under the target class's (in-memory) parameter names."""
    out = dense_to_llama(state, model)
    if model.tie_embeddings:  # transformers lists the tied head under its own name too
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    for i in range(model.num_layers):
        if moe.is_moe_layer(i):
            out |= _moe_layer(state, f"layers.{i}.ffn.", f"model.layers.{i}.mlp.", target, model.d_model)
    return out


def _moe_layer(state: dict, src: str, dst: str, target: Target, dim: int) -> dict[str, torch.Tensor]:
    """One MoE block's router, experts and (Qwen2-MoE) ungated shared expert."""
    out = {
        dst + "gate.weight": state[src + "scorer.router.weight"],
        dst + "experts.gate_up_proj": torch.cat([state[src + "experts.w_gate"], state[src + "experts.w_up"]], 1),
        dst + "experts.down_proj": state[src + "experts.w_down"],
    }
    if target.kind != "qwen2_moe":
        return out
    parts = [p for p in ("shared.", "dense.") if src + p + "gate.weight" in state]
    weights = {name: [state[f"{src}{p}{name}.weight"] for p in parts] for name in ("gate", "up", "down")}
    ref = state[src + "scorer.router.weight"]
    empty_FD, empty_DF = ref.new_zeros(0, dim), ref.new_zeros(dim, 0)
    out |= {
        dst + "shared_expert.gate_proj.weight": torch.cat(weights["gate"], 0) if parts else empty_FD,
        dst + "shared_expert.up_proj.weight": torch.cat(weights["up"], 0) if parts else empty_FD,
        dst + "shared_expert.down_proj.weight": 2 * torch.cat(weights["down"], 1) if parts else empty_DF,
        dst + "shared_expert_gate.weight": ref.new_zeros(1, dim),  # sigmoid(0) = 1/2, exactly
    }
    return out


def hf_model_class(target: Target):
    """The transformers class of a native target."""
    import transformers

    return {
        "llama": transformers.LlamaForCausalLM,
        "qwen2": transformers.Qwen2ForCausalLM,
        "mixtral": transformers.MixtralForCausalLM,
        "qwen2_moe": transformers.Qwen2MoeForCausalLM,
    }[target.kind]
