"""Recording routing decisions: run a model over held-out sequences and keep every MoE layer's choices.

Shape legend: T recorded tokens (B·L, sequence-major), E experts, K choices per token, S segments.
Per token: id, position, sequence, domain. Per MoE layer: router probabilities, combine weights
and, for token choice, the requested experts in choice order and whether each choice was kept
(False = dropped by the capacity). Per Lory layer: the routing weights of every segment, and the
same weights spread over the segment's tokens. Stored as one .npz per checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from megamoe.data import PackedSplit
from megamoe.model.moe.lory import token_weights


@dataclass
class Recording:
    """One checkpoint's routing over the recorded tokens."""

    token_T: np.ndarray
    position_T: np.ndarray
    sequence_T: np.ndarray
    domain_T: np.ndarray
    layers: dict[int, dict[str, np.ndarray]]
    """Block index → arrays: probs_TE, weight_TE, choice_TK, kept_TK (token choice); weight_TE, segment_SE (Lory)."""
    meta: dict = field(default_factory=dict)
    """routing, num_experts, top_k, segment_length, domains, step."""

    def save(self, path: Path) -> None:
        """Write an .npz (meta as JSON inside)."""
        arrays = {"token_T": self.token_T, "position_T": self.position_T, "sequence_T": self.sequence_T}
        arrays["domain_T"] = self.domain_T
        for layer, parts in self.layers.items():
            arrays.update({f"L{layer}/{name}": value for name, value in parts.items()})
        arrays["meta"] = np.frombuffer(json.dumps(self.meta).encode(), dtype=np.uint8)
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, **arrays)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> Recording:
        """Read what save wrote."""
        with np.load(path) as npz:
            arrays = {k: npz[k] for k in npz.files}
        meta = json.loads(arrays.pop("meta").tobytes().decode())
        base = {k: arrays.pop(k) for k in ("token_T", "position_T", "sequence_T", "domain_T")}
        layers: dict[int, dict[str, np.ndarray]] = {}
        for key, value in arrays.items():
            layer, name = key.split("/")
            layers.setdefault(int(layer[1:]), {})[name] = value
        return cls(**base, layers=dict(sorted(layers.items())), meta=meta)


def set_record_routing(model: nn.Module, on: bool) -> None:
    """Make every token-routed MoE block return its per-token decisions (MoELayerOutput.record)."""
    for module in model.modules():
        if hasattr(module, "record_routing"):
            module.record_routing = on


@torch.no_grad()
def record_routing(model: nn.Module, split: PackedSplit, seq_len: int, batches: list[np.ndarray], meta: dict):
    """Run the model (eval mode) over the batches of val sequence ids and collect a Recording."""
    device = next(model.parameters()).device
    model.eval()
    set_record_routing(model, True)
    base: dict[str, list] = {"token_T": [], "position_T": [], "sequence_T": [], "domain_T": []}
    parts: dict[int, dict[str, list]] = {}
    try:
        for ids in batches:
            batch = split.batch(ids, seq_len)
            out = model(batch.tokens_BL.to(device), batch.targets_BL.to(device))
            b, length = batch.tokens_BL.shape
            base["token_T"].append(batch.tokens_BL.flatten().numpy())
            base["position_T"].append(np.tile(np.arange(length), b))
            base["sequence_T"].append(np.repeat(np.asarray(ids), length))
            base["domain_T"].append(batch.domains_BL.flatten().numpy())
            for layer, moe in out.moe.items():
                for name, value in _layer_arrays(moe, length).items():
                    parts.setdefault(layer, {}).setdefault(name, []).append(value)
    finally:
        set_record_routing(model, False)
    layers = {k: {n: np.concatenate(v) for n, v in p.items()} for k, p in sorted(parts.items())}
    return Recording(**{k: np.concatenate(v) for k, v in base.items()}, layers=layers, meta=meta)


def _layer_arrays(moe, length: int) -> dict[str, np.ndarray]:
    """One MoE layer's arrays for one batch, tokens sequence-major (B·L)."""
    if moe.segment_weights is not None:  # Lory: (N, B, E) segment weights
        w_NBE = moe.segment_weights.float().cpu()
        w_BLE = token_weights(w_NBE, length)
        return {"weight_TE": w_BLE.reshape(-1, w_NBE.shape[2]).numpy(), "segment_SE": _flat(w_NBE)}
    out = {}
    for name, value in (moe.record or {}).items():
        out[name.replace("_LB", "_T")] = _flat(value.cpu())
    return out


def _flat(x_LB: torch.Tensor) -> np.ndarray:
    """(L, B, …) → (B·L, …) numpy, sequence-major."""
    x_BL = x_LB.transpose(0, 1)
    return x_BL.reshape(-1, *x_BL.shape[2:]).numpy()
