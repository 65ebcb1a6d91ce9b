"""HF config.json (Llama, Mistral, Qwen2) → megamoe ModelConfig fields, refusing what megamoe cannot compute.

Each refusal is one line naming the HF config key and the file.
"""

from __future__ import annotations

import logging
from pathlib import Path

from megamoe.errors import CheckpointError

log = logging.getLogger(__name__)

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
"""Supported model_type → its causal-LM class name in `architectures`."""
REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


def _refuse(where: Path, key: str, value: object, why: str) -> CheckpointError:
    """The one-line error for an unsupported config value."""
    return CheckpointError(f"{where}: {key} = {value!r} is not supported ({why})")


def check_family(hf: dict, where: Path) -> None:
    """model_type and architectures name a supported dense family."""
    kind = hf.get("model_type")
    if kind not in ARCHITECTURES:
        raise _refuse(where, "model_type", kind, f"import reads {', '.join(sorted(ARCHITECTURES))}")
    archs = hf.get("architectures") or [ARCHITECTURES[kind]]
    if archs != [ARCHITECTURES[kind]]:
        raise _refuse(where, "architectures", archs, f"expected [{ARCHITECTURES[kind]!r}]")
    missing = [key for key in REQUIRED if not isinstance(hf.get(key), int)]
    if missing:
        raise CheckpointError(f"{where}: {missing[0]} is missing or not an integer")


def rope_theta(hf: dict, where: Path) -> float:
    """The rotary base: transformers 5 `rope_parameters`, or the older top-level rope_theta / rope_scaling."""
    params = hf.get("rope_parameters") or {}
    kind = params.get("rope_type", "default")
    if kind != "default":
        raise _refuse(where, "rope_parameters.rope_type", kind, "megamoe's rotary is the default, unscaled one")
    if hf.get("rope_scaling"):
        raise _refuse(where, "rope_scaling", hf["rope_scaling"], "megamoe's rotary is the default, unscaled one")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def check_shapes(hf: dict, where: Path) -> None:
    """SiLU SwiGLU, no bias on attention output or MLP (Qwen2 q/k/v biases: model.qkv_bias), head_dim = hidden/heads."""
    if hf.get("hidden_act", "silu") != "silu":
        raise _refuse(where, "hidden_act", hf["hidden_act"], "megamoe's FFN is SwiGLU with SiLU")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key) and not (key == "attention_bias" and hf["model_type"] == "qwen2"):
            raise _refuse(where, key, hf[key], "megamoe's linears have no bias")
    width = hf["hidden_size"] // hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, width) or hf["hidden_size"] % hf["num_attention_heads"]:
        raise _refuse(where, "head_dim", hf.get("head_dim"), f"megamoe's head width is hidden_size/heads = {width}")


def check_window(hf: dict, seq_len: int, where: Path) -> None:
    """Sliding-window attention (Mistral, Qwen2) is only accepted when the window covers seq_len."""
    window = hf.get("sliding_window")
    sliding = hf.get("use_sliding_window", hf["model_type"] == "mistral")
    if hf["model_type"] == "qwen2" and "sliding_attention" in (hf.get("layer_types") or []):
        sliding = True
    if sliding and window is not None and window < seq_len:
        raise _refuse(where, "sliding_window", window, f"megamoe attends over the full model.seq_len ({seq_len})")


def model_fields(hf: dict, seq_len: int, where: Path) -> dict[str, object]:
    """ModelConfig fields for the checkpoint; seq_len = min(max_position_embeddings, the requested seq_len)."""
    check_family(hf, where)
    check_shapes(hf, where)
    limit = hf.get("max_position_embeddings") or seq_len
    if seq_len > limit:
        log.info("model.seq_len %d > max_position_embeddings %d of %s: using %d", seq_len, limit, where, limit)
    seq_len = min(seq_len, limit)
    check_window(hf, seq_len, where)
    return {
        "d_model": hf["hidden_size"], "num_layers": hf["num_hidden_layers"], "num_heads": hf["num_attention_heads"],
        "num_kv_heads": hf.get("num_key_value_heads") or hf["num_attention_heads"],
        "ffn_hidden_size": hf["intermediate_size"], "vocab_size": hf["vocab_size"], "seq_len": seq_len,
        "rope_theta": rope_theta(hf, where), "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)), "qkv_bias": hf["model_type"] == "qwen2",
    }  # fmt: skip
