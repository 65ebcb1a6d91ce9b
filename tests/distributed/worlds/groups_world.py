"""A 4-rank world (tp2 × dp2; experts ep2 × etp1 × edp2) that records group memberships and gradient reductions.

Run under torchrun; each rank writes OUT_DIR/rank<r>.json for tests/distributed/test_groups.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.utils import groups as ds_groups
from deepspeed.utils import safe_get_full_grad
from torch import nn

from megamoe.config import load_config
from megamoe.config.resolve import with_vocab
from megamoe.model import build_model
from megamoe.model.params import count_parameters, meta_counts
from megamoe.parallel.groups import destroy_groups, init_groups
from megamoe.parallel.layout import resolve_layout
from megamoe.parallel.specs import ParallelFactory, ShardShapeFactory
from megamoe.parallel.zero import ZeroEngine, deepspeed_config, expert_group_name, mark_expert


class Toy(nn.Module):
    """One ordinary and one expert parameter: loss = Σ dense·x + Σ expert·y."""

    def __init__(self):
        super().__init__()
        self.dense = nn.Parameter(torch.zeros(4))
        self.expert = nn.Parameter(torch.zeros(4))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (self.dense * x).sum() + (self.expert * y).sum()


def reduced_grads(groups, stage: int) -> dict:
    """Gradients of Toy after DeepSpeed's reduction, with rank-dependent inputs."""
    toy = Toy()
    mark_expert(toy.expert, groups)
    optimizer = torch.optim.AdamW([{"name": "all", "params": list(toy.parameters())}], lr=0.1)
    config = deepspeed_config(1, 1, groups.dp.size, stage, 0.0, False)
    engine = ZeroEngine(toy, optimizer, groups, config).engine
    rank = dist.get_rank()
    loss = toy(torch.full((4,), float(rank + 1)), torch.full((4,), 10.0 * (rank + 1)))
    engine.backward(loss)
    grad = {n: (safe_get_full_grad(p) if stage else p.grad).tolist() for n, p in toy.named_parameters()}
    name = expert_group_name(groups)
    return {
        "grad": grad,
        "ds_dp": dist.get_process_group_ranks(ds_groups._get_data_parallel_group()),
        "ds_edp": dist.get_process_group_ranks(engine.expert_data_parallel_group[name]),
        "ds_ep": dist.get_process_group_ranks(engine.expert_parallel_group[name]),
    }


def main(out_dir: Path) -> None:
    cfg = load_config(None, ["parallel.tensor_parallel=2", "parallel.expert_parallel=2", "model.d_model=64"])
    cfg = with_vocab(cfg, 512, "test")
    groups = init_groups(resolve_layout(cfg, 4), timeout_s=120)
    record = {
        "megatron": {ax: getattr(groups, ax).ranks for ax in ("tp", "dp", "ep", "etp", "edp")},
        "zero": {stage: reduced_grads(groups, stage) for stage in (0, 1, 2)},
    }
    factory = ParallelFactory(2, groups)
    record["params_this_rank"] = count_parameters(build_model(cfg.model, 0, factory)).total
    record["params_shape_factory"] = meta_counts(cfg.model, ShardShapeFactory(2)).total
    (out_dir / f"rank{dist.get_rank()}.json").write_text(json.dumps(record))
    destroy_groups()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
