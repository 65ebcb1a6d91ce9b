"""Router overhead: RMoE's GRU scorer and GRIN's SparseMixer-v2 against the linear top-k router, as ratios in one run.

Usage: python bench/router_overhead.py [--tokens N] [--repeats R] [--device cpu|cuda]
Two timings per variant, forward+backward, best of the repeats:
- router only: scorer (+ GRU) and routing, with the backward through the combine weights;
- whole MoE block: router + dispatch + 8 experts + combine.
"""

from __future__ import annotations

import argparse

import torch

from bench.moe_block import timed
from megamoe.config import ModelConfig, load_config
from megamoe.model.factory import LayerFactory
from megamoe.model.init import init_parameters
from megamoe.model.moe import MoEFFN
from megamoe.model.moe.gru import GRUCell
from megamoe.model.moe.routing import route
from megamoe.model.moe.state import RoutingState
from megamoe.utils.host import describe_device

VARIANTS = {
    "linear + top-2": ["moe.routing=topk"],
    "GRU (p=128) + top-2": ["moe.routing=topk", "moe.scorer=gru"],
    "linear + SparseMixer-v2": ["moe.routing=sparsemixer"],
    "GRU + SparseMixer-v2": ["moe.routing=sparsemixer", "moe.scorer=gru"],
}


def build(overrides: list[str], model: ModelConfig, device: str) -> tuple[MoEFFN, GRUCell | None]:
    """A seeded MoE block (and the shared GRU for the GRU scorer)."""
    cfg = load_config(None, ["moe.num_experts=8", "moe.top_k=2", *overrides]).moe
    block = MoEFFN(model, cfg, LayerFactory()).to(device)
    gru = GRUCell(cfg.gru_hidden).to(device) if cfg.scorer == "gru" else None
    for module in (block, gru):
        if module is not None:
            init_parameters(module, model, seed=0)
    return block, gru


def router_step(block: MoEFFN, gru: GRUCell | None, x_TD: torch.Tensor):
    """Scorer + routing, backward through the combine weights."""

    def step():
        state = RoutingState(gru=gru)
        logits = block.logits(x_TD, state, None)
        assign = route(logits, block.cfg, True)
        assign.weight_A.sum().backward()

    return step


def block_step(block: MoEFFN, gru: GRUCell | None, x_LBD: torch.Tensor):
    """The whole block, forward and backward."""

    def step():
        y, aux = block(x_LBD, RoutingState(gru=gru))
        (y.pow(2).mean() + sum(aux.losses.values())).backward()

    return step


def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    seqs = 16
    model = ModelConfig(d_model=256, num_heads=4, seq_len=args.tokens // seqs, vocab_size=64, ffn_hidden_size=704)
    x_LBD = torch.randn(args.tokens // seqs, seqs, 256, device=args.device, requires_grad=True)
    x_TD = x_LBD.detach().reshape(-1, 256).requires_grad_()
    print(
        f"machine: {describe_device(args.device)}; torch {torch.__version__}; "
        f"d 256, 8 experts of 704, {args.tokens} tokens\n"
    )
    print("| router | router time (ms) | router ratio | MoE block time (ms) | block ratio |\n|---|---|---|---|---|")
    base = None
    for name, overrides in VARIANTS.items():
        block, gru = build(overrides, model, args.device)
        t_router = timed(router_step(block, gru, x_TD), args.repeats)
        t_block = timed(block_step(block, gru, x_LBD), args.repeats)
        base = base or (t_router, t_block)
        print(
            f"| {name} | {1e3 * t_router:.2f} | {t_router / base[0]:.2f} | "
            f"{1e3 * t_block:.1f} | {t_block / base[1]:.2f} |"
        )


if __name__ == "__main__":
    main()
