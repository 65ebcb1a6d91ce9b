"""A 4-rank world that checks one MoE block, layout by layout, against the single-process block.

For each case: the same seeded block runs on every DP rank's micro-batch (TP/SP/EP/ETP as the case
says) and, on every rank, in a single process on the same micro-batches. Compared: the output,
the aux losses, and the gradients of the input, the router and every expert weight, after the
reductions DeepSpeed applies (router: mean over DP; experts: sum over expert-DP divided by DP;
expert shards gathered to full tensors). Each rank writes OUT_DIR/rank<r>.json: case → the largest
relative difference (max |diff| / max |reference| per compared tensor) and the routed load.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megamoe.config import load_config
from megamoe.config.resolve import with_vocab
from megamoe.model.init import init_parameters
from megamoe.model.moe import MoEFFN
from megamoe.model.moe.gru import GRUCell
from megamoe.model.moe.lory import LoryFFN
from megamoe.model.moe.noise import RoutingContext
from megamoe.model.moe.state import RoutingState
from megamoe.parallel.comm import all_gather_dim0
from megamoe.parallel.groups import destroy_groups, init_groups
from megamoe.parallel.layout import resolve_layout
from megamoe.parallel.specs import ParallelFactory

BASE = [
    "model.d_model=32", "model.num_heads=4", "model.seq_len=16", "model.ffn_hidden_size=48", "moe.routing=topk",
    "moe.num_experts=4", "moe.top_k=2", "train.micro_batch_size=2", "train.global_batch_size=8",
]  # fmt: skip
TP2, SP = "parallel.tensor_parallel=2", "parallel.sequence_parallel=true"
LORY = ["moe.routing=lory", "moe.segment_length=4"]
CASES = {
    "ep4": ["parallel.expert_parallel=4"],
    "ep2-etp2": ["parallel.expert_parallel=2", "parallel.expert_tensor_parallel=2"],
    "tp2-ep2": ["parallel.tensor_parallel=2", "parallel.expert_parallel=2"],
    "tp2-ep2-sp": ["parallel.tensor_parallel=2", "parallel.expert_parallel=2", "parallel.sequence_parallel=true"],
    "tp2-sp-sequence-level": [TP2, SP, "moe.balance_loss_level=sequence"],
    "ep2-global-level": ["parallel.expert_parallel=2", "moe.balance_loss_level=global"],
    "ep2-capacity": ["parallel.expert_parallel=2", "moe.capacity_factor=1.0", "moe.min_capacity=1"],
    "ep2-expert-choice": ["parallel.expert_parallel=2", "moe.routing=expert_choice", "moe.capacity_factor=1.5"],
    "ep2-zero-token-rank": ["parallel.expert_parallel=2"],
    "etp2-shared-residual": [TP2, "parallel.expert_tensor_parallel=2", "moe.num_shared_experts=1", "moe.residual=true"],
    "ep2-sparsemixer": ["parallel.expert_parallel=2", "moe.routing=sparsemixer", "moe.jitter_eps=0.3",
                        "moe.balance_loss_level=micro_batch"],
    "tp2-sp-sparsemixer-gru": [TP2, SP, "moe.routing=sparsemixer", "moe.scorer=gru", "moe.gru_hidden=8",
                               "moe.jitter_eps=0.3", "moe.balance_loss_level=micro_batch"],
    "tp2-ep2-gru-jitter": [TP2, "parallel.expert_parallel=2", "moe.scorer=gru", "moe.gru_hidden=8",
                           "moe.input_jitter_eps=0.5"],
    # Lory: experts split along F over EP, whole sequences per TP rank, 4 segments of 4 tokens
    "lory-ep2": [*LORY, "parallel.expert_parallel=2"],
    "lory-ep4": [*LORY, "parallel.expert_parallel=4"],
    "lory-tp2": [*LORY, TP2],
    "lory-tp2-sp-ep2": [*LORY, TP2, SP, "parallel.expert_parallel=2"],
    "lory-tp2-ep2-gru-prefix": [*LORY, TP2, "parallel.expert_parallel=2", "moe.scorer=gru", "moe.gru_hidden=8",
                                "moe.routing_mode=prefix"],
}  # fmt: skip


def make_block(cfg, factory=None) -> MoEFFN | LoryFFN:
    """The MoE block with layout-independent seeded weights (and RMoE's GRU, when the scorer is a GRU)."""
    cls = LoryFFN if cfg.moe.routing == "lory" else MoEFFN
    block = cls(cfg.model, cfg.moe, factory or _plain())
    block.gru = GRUCell(cfg.moe.gru_hidden) if cfg.moe.scorer == "gru" else None
    init_parameters(block, cfg.model, seed=7)
    if cls is LoryFFN:  # decisive routing weights: a wrong segment's weights would show
        with torch.no_grad():
            block.scorer.router.weight.mul_(25.0)
    return block


def state_for(block: MoEFFN, sample_ids: range) -> RoutingState:
    """Routing context of a micro-batch whose sequences have these sample ids, and a fresh GRU state."""
    return RoutingState(RoutingContext(seed=3, step=0, sample_ids=tuple(sample_ids)), block.gru)


def _plain():
    from megamoe.model import LayerFactory

    return LayerFactory()


def force_rank0_experts(block: MoEFFN) -> None:
    """Router weights that send every (positive) token to experts 0 and 1, both on EP rank 0."""
    with torch.no_grad():
        w = block.scorer.router.weight
        w.copy_(torch.tensor([[1.0], [0.9], [-1.0], [-1.1]]).expand_as(w) * 0.05)


def objective(block: MoEFFN, x, proj, n_full: int, state: RoutingState):
    """Σ(y·proj)/N over this rank's rows plus the block's aux losses (the per-rank training loss)."""
    y, out = block(x, state)
    return (y * proj).sum() / n_full + sum(out.losses.values()), y, out


def reference(cfg, xs, projs, global_level: bool, zero_token: bool):
    """The single-process block on each DP micro-batch (one union micro-batch for the global level)."""
    block = make_block(cfg)
    if zero_token:
        force_rank0_experts(block)
    B = xs[0].shape[1]
    ids = [range(d * B, (d + 1) * B) for d in range(len(xs))]
    if global_level:
        xs, projs, ids = [torch.cat(xs, 1)], [torch.cat(projs, 1)], [range(len(xs) * B)]
    outs = []
    for x, proj, sample_ids in zip(xs, projs, ids):
        x = x.clone().requires_grad_()
        obj, y, out = objective(block, x, proj, proj.numel(), state_for(block, sample_ids))
        outs.append((x, y, out.losses, obj))
    (sum(o[3] for o in outs) / len(outs)).backward()
    return block, outs


def _gather_dim(t: torch.Tensor, dim: int, group) -> torch.Tensor:
    """All-gather along one dim."""
    moved = t.movedim(dim, 0).contiguous()
    return all_gather_dim0(moved, group).movedim(0, dim)


def run_case(name: str, overrides: list[str]) -> dict:
    """Max |parallel - reference| over everything compared, and the routed load, for one case."""
    cfg = with_vocab(load_config(None, [*BASE, *overrides]), 64, "test")
    groups = init_groups(resolve_layout(cfg, 4), timeout_s=120)
    dp, tp = groups.dp, groups.tp
    gen = torch.Generator().manual_seed(0)
    L, B, D = 16, 2, 32
    xs = [torch.rand(L, B, D, generator=gen) - (0.0 if "zero-token" in name else 0.5) for _ in range(dp.size)]
    projs = [torch.randn(L, B, D, generator=gen) for _ in range(dp.size)]
    ref_block, ref = reference(cfg, xs, projs, "global" in name, "zero-token" in name)
    block = make_block(cfg, ParallelFactory(tp.size, groups, cfg.parallel.sequence_parallel))
    if "zero-token" in name:
        force_rank0_experts(block)
    sp = cfg.parallel.sequence_parallel
    x_full, proj = xs[dp.rank], projs[dp.rank]
    rows = slice(tp.rank * L // tp.size, (tp.rank + 1) * L // tp.size) if sp else slice(None)
    x = x_full[rows].clone().requires_grad_()
    obj, y, out = objective(block, x, proj[rows], proj.numel(), state_for(block, range(dp.rank * B, (dp.rank + 1) * B)))
    obj.backward()
    losses = out.losses
    ref_x, ref_y, ref_losses, _ = ref[0] if "global" in name else ref[dp.rank]
    if "global" in name:  # the union micro-batch: this rank's sequences are batch columns [d·B, (d+1)·B)
        cols = slice(dp.rank * B, (dp.rank + 1) * B)
        ref_y, ref_xgrad = ref_y[:, cols], ref_x.grad[:, cols]
    else:
        ref_xgrad = ref_x.grad
    # the reference backpropagates the mean over the DP micro-batches; a rank backpropagates its own
    diffs = [rel_diff(y, ref_y[rows]), rel_diff(x.grad / dp.size, ref_xgrad[rows])]
    if "global" not in name:
        diffs += [rel_diff(losses[k], ref_losses[k]) for k in ref_losses]
    diffs += _param_diffs(block, ref_block, groups)
    result = {
        "max_diff": float(torch.stack([d.detach().float() for d in diffs]).max()),
        "load": out.stats.load_E.tolist(),
    }
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    return result


def _param_diffs(block: MoEFFN, ref_block: MoEFFN, groups) -> list[torch.Tensor]:
    """Router and expert gradients after DeepSpeed's reductions (experts: Σ over expert-DP / DP) vs the reference."""
    ref = dict(ref_block.named_parameters())
    diffs = []
    for pname, param in block.named_parameters():
        grad = param.grad.clone()
        if getattr(param, "expert", False):
            dist.all_reduce(grad, group=groups.edp.group)
            grad /= groups.dp.size
            grad = _gather_expert(grad, param, groups)
        else:
            if param.ndim == 2 and getattr(param, "shards", ()):
                continue  # TP-sharded dense layers (shared/residual FFN) are covered by the layout tests
            dist.all_reduce(grad, group=groups.dp.group)
            grad /= groups.dp.size
        diffs.append(rel_diff(grad, ref[pname].grad))
    return diffs


def rel_diff(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """max |got − want| relative to max |want| (sensitive to routing changes whatever the output scale)."""
    return (got - want).abs().max() / want.abs().max().clamp_min(1e-12)


def _gather_expert(grad: torch.Tensor, param, groups) -> torch.Tensor:
    """Full expert gradient from this rank's EP/ETP shard."""
    for axis, dim, _, _ in getattr(param, "shards", ()):
        grad = _gather_dim(grad, dim, getattr(groups, axis).group)
    return grad


def main(out_dir: Path) -> None:
    dist.init_process_group("gloo")
    results = {}
    for name, overrides in CASES.items():
        results[name] = run_case(name, overrides)
    (out_dir / f"rank{dist.get_rank()}.json").write_text(json.dumps(results))
    destroy_groups()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
