"""Read a HF dense checkpoint's safetensors (one file or sharded) into megamoe's dense parameter names, in fp32."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from megamoe.config import ModelConfig
from megamoe.errors import CheckpointError
from megamoe.interop.layout import dense_to_llama, llama_to_dense
from megamoe.model import Transformer

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
IGNORED = ("rotary_emb.inv_freq",)
"""Tensors some checkpoints carry that are recomputed, not learned."""


def shard_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint: model.safetensors, or those its index maps to."""
    if (folder / SINGLE).is_file():
        return [folder / SINGLE]
    index = folder / INDEX
    if not index.is_file():
        raise CheckpointError(f"{folder}: neither {SINGLE} nor {INDEX} found (import reads safetensors only)")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index}: not a readable safetensors index ({err})") from None
    return [folder / name for name in sorted(set(weight_map.values()))]


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every shard, in fp32."""
    tensors = {}
    for path in shard_files(folder):
        try:
            tensors |= load_file(str(path))
        except (OSError, SafetensorError) as err:
            raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    return {name: t.float() for name, t in tensors.items() if not name.endswith(IGNORED)}


def read_dense_state(folder: Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """megamoe's dense state dict from DIR's safetensors, every name and shape checked against cfg."""
    tensors = read_tensors(folder)
    try:
        state = llama_to_dense(tensors, cfg)
    except KeyError as err:
        raise CheckpointError(f"{folder}: tensor {err.args[0]} is missing from the safetensors") from None
    except RuntimeError as err:  # fuse_qkv's reshape: q/k/v sizes disagree with the head counts
        raise CheckpointError(f"{folder}: q/k/v projections do not fit config.json's heads ({err})") from None
    extra = sorted(set(tensors) - set(dense_to_llama(state, cfg)) - {"lm_head.weight"})
    if extra:
        raise CheckpointError(
            f"{folder}: unexpected tensor {extra[0]} (not part of a dense {cfg.num_layers}-layer model)"
        )
    if (
        cfg.tie_embeddings
        and "lm_head.weight" in tensors
        and not torch.equal(tensors["lm_head.weight"], state["embed.weight"])
    ):
        raise CheckpointError(f"{folder}: lm_head.weight differs from the embedding, but tie_word_embeddings is true")
    _check_shapes(state, cfg, folder)
    return state


def _check_shapes(state: dict[str, torch.Tensor], cfg: ModelConfig, folder: Path) -> None:
    """Every imported tensor has the shape of the megamoe parameter it becomes."""
    with torch.device("meta"):
        model = Transformer(cfg)
    for name, param in model.named_parameters():
        if state[name].shape != param.shape:
            raise CheckpointError(
                f"{folder}: {name} has shape {tuple(state[name].shape)}, config.json implies {tuple(param.shape)}"
            )
