"""Sparse upcycling: a dense model's state dict → a MoE model's, computing the same function at step 0.

Shape legend: E experts, F dense FFN width, f = F/g expert width, g granularity, D model width.

Every MoE block's routed experts come from that block's dense SwiGLU FFN. With granularity
g = model.ffn_hidden / expert width (megatron-core's upcycling granularity), the dense FFN is cut
along F into g slices and expert j holds slice j mod g; g = 1 copies the whole FFN into every expert.
SwiGLU is a sum over its F hidden units, so the g slices sum to the dense FFN exactly. Because
SiLU is not homogeneous, the output scale c is put on w_down only (the output is linear in it;
megatron-core's c^(1/3) on every matrix is not function-preserving):

* renormalized top-k (softmax or sigmoid): the router is the fresh random init, its rows repeated
  within each group of g consecutive experts (router row j = base row j // g, as megatron-core), so
  a group's members tie and top-k with g | k picks whole groups; weights sum to 1 and are equal
  within a group, so c = g gives Σ_groups W_G/g · g · FFN = FFN for any router.
* unnormalized top-k (g = 1 only): the router starts at zero, so every score is s0 = 1/E (softmax)
  or 1/2 (sigmoid) and the k chosen weights sum to k·s0; c = 1/(k·s0).
* Lory (g = 1 only): copies merge to the dense FFN for any weights; c = 1 (the trainer's warm-up
  switch, megamoe.train.upcycle, then draws the router).
* residual MoE: the dense branch and the experts each get half (w_down × ½); shared experts start
  with w_down = 0 (their gate/up keep the fresh init), so they add nothing at step 0.

Refused, naming the key: expert choice and SparseMixer (which tokens an expert sees, or the
weights, are not fixed by the scores), a capacity factor (drops), and g > 1 without renormalized
top-k. moe.upcycle_noise > 0 multiplies every expert weight by 1 + ε·N(0, 1) (no longer exact).
"""

from __future__ import annotations

import torch

from megamoe.config import ModelConfig, MoEConfig
from megamoe.errors import ConfigError
from megamoe.model.init import param_seed

EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")
"""The stacked expert tensors of a MoE block: w_gate, w_up (E, f, D), w_down (E, D, f)."""


def granularity(model: ModelConfig, moe: MoEConfig) -> int:
    """g = dense FFN width / expert width, or a ConfigError naming moe.expert_hidden_size."""
    width = moe.expert_hidden_size or model.ffn_hidden
    if width > model.ffn_hidden or model.ffn_hidden % width:
        raise ConfigError(
            "moe.expert_hidden_size",
            f"upcycling cuts the dense FFN (model.ffn_hidden_size {model.ffn_hidden}) into equal expert slices; "
            f"{width} does not divide it",
        )
    return model.ffn_hidden // width


def check_upcyclable(model: ModelConfig, moe: MoEConfig) -> int:
    """Raise ConfigError (naming the moe key) where no function-preserving upcycled init exists; returns g."""
    if moe.routing in ("expert_choice", "sparsemixer"):
        why = "experts pick their tokens" if moe.routing == "expert_choice" else "training weights carry a random ω"
        raise ConfigError("moe.routing", f"{moe.routing} cannot be upcycled exactly from a dense FFN ({why})")
    for key in ("capacity_factor", "eval_capacity_factor"):
        if getattr(moe, key) > 0:
            raise ConfigError(f"moe.{key}", "upcycling needs dropless routing (0): dropped tokens change the function")
    g = granularity(model, moe)
    if g > 1 and moe.routing != "topk":
        raise ConfigError("moe.expert_hidden_size", f"fine-grained upcycling (granularity {g}) needs topk routing")
    if g > 1 and not moe.renormalize:
        raise ConfigError("moe.renormalize", f"fine-grained upcycling (granularity {g}) needs renormalized weights")
    for key, value in (("num_experts", moe.num_experts), ("top_k", moe.top_k)):
        if value % g:
            raise ConfigError(f"moe.{key}", f"({value}) must be a multiple of the upcycling granularity {g}")
    return g


def output_scale(moe: MoEConfig, g: int) -> float:
    """c, the factor on every expert's w_down that makes the routed output equal the dense FFN's."""
    if moe.routing == "lory":
        scale = 1.0
    elif moe.renormalize:
        scale = float(g)
    else:
        score = 1.0 / moe.num_experts if moe.score_fn == "softmax" else 0.5
        scale = 1.0 / (moe.top_k * score)
    return scale / 2 if moe.residual else scale


def split_experts(
    gate_FD: torch.Tensor, up_FD: torch.Tensor, down_DF: torch.Tensor, num_experts: int, g: int, scale: float
) -> dict[str, torch.Tensor]:
    """Expert j ← slice j mod g of the dense FFN (w_down × scale)."""
    index_E = torch.arange(num_experts) % g
    gate_gfD, up_gfD = gate_FD.unflatten(0, (g, -1)), up_FD.unflatten(0, (g, -1))
    down_gDf = down_DF.unflatten(1, (g, -1)).transpose(0, 1)
    return {"w_gate": gate_gfD[index_E].clone(), "w_up": up_gfD[index_E].clone(), "w_down": down_gDf[index_E] * scale}


def router_init(fresh_EX: torch.Tensor, moe: MoEConfig, g: int) -> torch.Tensor:
    """Zeros for unnormalized top-k; else the fresh router with rows repeated within groups of g."""
    if moe.routing == "topk" and not moe.renormalize:
        return torch.zeros_like(fresh_EX)
    return fresh_EX[: len(fresh_EX) // g].repeat_interleave(g, 0)


def upcycle_block(dense: dict, fresh: dict, src: str, dst: str, model: ModelConfig, moe: MoEConfig) -> dict:
    """One MoE block's tensors (names under dst) from the dense FFN under src."""
    g = check_upcyclable(model, moe)
    gate, up, down = (dense[f"{src}{name}.weight"] for name in ("gate", "up", "down"))
    out = {
        f"{dst}experts.{k}": v
        for k, v in split_experts(gate, up, down, moe.num_experts, g, output_scale(moe, g)).items()
    }
    out[f"{dst}scorer.router.weight"] = router_init(fresh[f"{dst}scorer.router.weight"], moe, g)
    if f"{dst}dense.down.weight" in fresh:
        out |= {f"{dst}dense.{n}.weight": t for n, t in (("gate", gate), ("up", up), ("down", down / 2))}
    if f"{dst}shared.down.weight" in fresh:
        out[f"{dst}shared.down.weight"] = torch.zeros_like(fresh[f"{dst}shared.down.weight"])
    return out


def upcycle_state(
    dense: dict[str, torch.Tensor], fresh: dict[str, torch.Tensor], model: ModelConfig, moe: MoEConfig
) -> dict[str, torch.Tensor]:
    """The MoE state: dense tensors where names match, MoE blocks upcycled, the rest (GRU, projector) fresh."""
    out = dict(fresh) | {name: tensor for name, tensor in dense.items() if name in fresh}
    for i in range(model.num_layers):
        if moe.is_moe_layer(i):
            out |= upcycle_block(dense, fresh, f"layers.{i}.ffn.", f"layers.{i}.ffn.", model, moe)
    return out


def is_expert_weight(name: str) -> bool:
    """name is a routed expert tensor (the ones upcycling copies, and moe.upcycle_noise perturbs)."""
    return ".experts." in name and name.rsplit(".", 1)[-1] in EXPERT_WEIGHTS


def noise_factor(name: str, shape: tuple[int, ...], eps: float, seed: int) -> torch.Tensor:
    """1 + eps·N(0, 1) of the full tensor's shape, drawn from (seed, name): the same under every layout."""
    gen = torch.Generator().manual_seed(param_seed(seed, name + ".upcycle_noise"))
    return 1 + eps * torch.randn(shape, generator=gen)
