"""Parallel layers for the model's layer factory: the only file that names megatron-core's layer classes.

Shape legend: L sequence (S = L/tp under sequence parallelism), B batch, D width, I/O features,
V vocabulary (per TP rank where split).

The parameters come from megatron-core's ColumnParallelLinear / RowParallelLinear /
VocabParallelEmbedding: their partitioning, their `tensor_model_parallel` / `partition_dim`
attributes (which DeepSpeed reads to count sharded gradients once in the global norm) and
megatron's loss, vocab_parallel_cross_entropy. The forward is megatron-core's communication
mapping (copy-to / reduce-from the TP region) around F.linear. Under sequence parallelism it uses
megamoe.parallel.comm instead, because megatron's fused linear and its sequence mappings allocate
on CUDA. Every sharded parameter also gets `shard = (dim, rank, tp)`: the seeded init then hands
each rank its slice of the single-process weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    set_tensor_model_parallel_attributes,
    vocab_parallel_cross_entropy,
)
from torch import nn

from megamoe.model.factory import LayerFactory
from megamoe.model.layers import RMSNorm
from megamoe.model.moe.experts import GroupedExperts
from megamoe.model.moe.tokens import TokenGroup
from megamoe.parallel.comm import gather_sequence, reduce_scatter_sequence, scatter_sequence
from megamoe.parallel.groups import ParallelGroups
from megamoe.parallel.moe import AllToAllDispatcher, ParallelTokenGroup


def _no_init(weight: torch.Tensor) -> None:
    """megatron-core's init hook; megamoe initializes every parameter itself (model/init.py)."""


def _mark_shard(param: nn.Parameter, dim: int, group: dist.ProcessGroup) -> None:
    """Record which slice of the full tensor this rank holds (ours and megatron-core's attributes).

    megatron-core sets `tensor_model_parallel` only when it initializes the weight itself; without it
    DeepSpeed would count a sharded gradient as replicated (TP rank 0 only) in the clipping norm.
    """
    param.shards = (("tp", dim, dist.get_rank(group), dist.get_world_size(group)),)
    set_tensor_model_parallel_attributes(param, is_parallel=True, dim=dim, stride=1)


def _enter_tp(x: torch.Tensor, group: dist.ProcessGroup, sp: bool) -> torch.Tensor:
    """Input of a column-parallel matmul: gather the sequence (SP) or mark the TP region (grads all-reduced)."""
    return gather_sequence(x, group) if sp else copy_to_tensor_model_parallel_region(x, group=group)


def _leave_tp(y: torch.Tensor, group: dist.ProcessGroup, sp: bool) -> torch.Tensor:
    """Output of a row-parallel matmul: sum over TP ranks (reduce-scatter along the sequence under SP)."""
    return reduce_scatter_sequence(y, group) if sp else reduce_from_tensor_model_parallel_region(y, group=group)


class Column(ColumnParallelLinear):
    """Column-parallel linear: x_LBI (x_SBI under SP) → y_LB(O/tp)."""

    def __init__(
        self, in_features: int, out_features: int, config: ModelParallelConfig, group, sp: bool, bias: bool = False
    ):
        super().__init__(
            in_features,
            out_features,
            config=config,
            init_method=_no_init,
            bias=bias,
            gather_output=False,
            tp_group=group,
        )
        self.sp = sp
        _mark_shard(self.weight, 0, group)
        if bias:  # megatron-core already marked it tensor-parallel (it initializes biases itself)
            self.bias.shards = (("tp", 0, dist.get_rank(group), dist.get_world_size(group)),)

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Matmul (+ bias) with this rank's output rows (weight overrides them for a tied head)."""
        x = _enter_tp(x, self.tp_group, self.sp)
        return F.linear(x, self.weight if weight is None else weight, self.bias)


class Row(RowParallelLinear):
    """Row-parallel linear: x_LB(I/tp) → y_LBO summed over TP ranks (y_SBO under SP)."""

    def __init__(self, in_features: int, out_features: int, config: ModelParallelConfig, group, sp: bool):
        super().__init__(
            in_features, out_features, config=config, init_method=_no_init, bias=False,
            input_is_parallel=True, skip_bias_add=True, tp_group=group,
        )  # fmt: skip
        self.sp = sp
        _mark_shard(self.weight, 1, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Partial matmul, then the TP reduction."""
        return _leave_tp(F.linear(x, self.weight), self.tp_group, self.sp)


class Embedding(VocabParallelEmbedding):
    """Vocab-parallel embedding: tokens_BL → h_LBD (h_SBD under SP)."""

    def __init__(self, vocab_size: int, dim: int, config: ModelParallelConfig, group, sp: bool):
        super().__init__(vocab_size, dim, init_method=_no_init, config=config, tp_group=group)
        self.sp = sp
        _mark_shard(self.weight, 0, group)

    def forward(self, tokens_BL: torch.Tensor) -> torch.Tensor:
        """Masked lookup of this rank's vocabulary rows, all-reduced (then split along the sequence)."""
        h_LBD = super().forward(tokens_BL.t())
        return scatter_sequence(h_LBD, self.tp_group) if self.sp else h_LBD


class TiedHead(nn.Module):
    """LM head through this rank's rows of the embedding matrix: h_LBD → logits_LB(V/tp)."""

    def __init__(self, group, sp: bool):
        super().__init__()
        self.group, self.sp = group, sp

    def forward(self, h: torch.Tensor, weight_VD: torch.Tensor | None = None) -> torch.Tensor:
        """Column-parallel matmul with the embedding shard."""
        assert weight_VD is not None, "a tied head needs the embedding weight"
        return F.linear(_enter_tp(h, self.group, self.sp), weight_VD)


class SequenceParallelRMSNorm(RMSNorm):
    """RMSNorm on a sequence slice: its scale's gradient is summed over the TP ranks."""

    def __init__(self, dim: int, eps: float, group):
        super().__init__(dim, eps)
        self.group = group

    def scale(self) -> torch.Tensor:
        """Identity forward, all-reduce of the gradient in backward."""
        return copy_to_tensor_model_parallel_region(self.weight, group=self.group)


@dataclass(frozen=True)
class ParallelFactory(LayerFactory):
    """Layers for one rank of a parallel layout: TP layers when TP > 1, sharded experts and all-to-all under EP/ETP."""

    groups: ParallelGroups | None = None
    sequence_parallel: bool = False

    @property
    def _tp(self):
        return self.groups.tp.group

    def _config(self) -> ModelParallelConfig:
        """megatron-core settings: CPU allocation, no megatron init (ours is layout-independent)."""
        return ModelParallelConfig(
            tensor_model_parallel_size=self.tp_size,
            use_cpu_initialization=True,
            perform_initialization=False,
            params_dtype=torch.float32,
        )

    def column(self, in_features: int, out_features: int, bias: bool = False) -> nn.Module:
        if self.tp_size == 1:
            return super().column(in_features, out_features, bias)
        return Column(in_features, out_features, self._config(), self._tp, self.sequence_parallel, bias)

    def row(self, in_features: int, out_features: int) -> nn.Module:
        if self.tp_size == 1:
            return super().row(in_features, out_features)
        return Row(in_features, out_features, self._config(), self._tp, self.sequence_parallel)

    def embedding(self, vocab_size: int, dim: int) -> nn.Module:
        if self.tp_size == 1:
            return super().embedding(vocab_size, dim)
        return Embedding(vocab_size, dim, self._config(), self._tp, self.sequence_parallel)

    def lm_head(self, dim: int, vocab_size: int, tied: bool) -> nn.Module:
        if self.tp_size == 1:
            return super().lm_head(dim, vocab_size, tied)
        if tied:
            return TiedHead(self._tp, self.sequence_parallel)
        return Column(dim, vocab_size, self._config(), self._tp, self.sequence_parallel)

    def norm(self, dim: int, eps: float) -> nn.Module:
        if self.sequence_parallel:
            return SequenceParallelRMSNorm(dim, eps, self._tp)
        return RMSNorm(dim, eps)

    def experts(self, num_experts: int, dim: int, hidden: int) -> nn.Module:
        ep, etp = self.groups.ep, self.groups.etp
        return GroupedExperts(num_experts, dim, hidden, ep=(ep.rank, ep.size), etp=(etp.rank, etp.size))

    def lory_experts(self, num_experts: int, dim: int, hidden: int) -> nn.Module:
        from megamoe.model.moe.lory import LoryExperts

        ep = self.groups.ep
        return LoryExperts(num_experts, dim, hidden, ep=(ep.rank, ep.size))

    def lory_comm(self):
        from megamoe.parallel.lory import ParallelLoryComm

        return ParallelLoryComm(self.groups.tp, self.groups.ep, self.sequence_parallel)

    def dispatcher(self, num_experts: int):
        if self.groups.ep.size == 1 and self.groups.etp.size == 1:
            return super().dispatcher(num_experts)
        return AllToAllDispatcher(num_experts, self.groups)

    def token_group(self) -> TokenGroup:
        return ParallelTokenGroup(self.groups.tp, self.groups.dp, self.sequence_parallel)

    def head_region(self, hn_LBD, w_VD):
        """Under TP the vocab-parallel head's input enters the TP region (the sequence gather under SP)."""
        if self.tp_size == 1:
            return super().head_region(hn_LBD, w_VD)
        h_LBD = _enter_tp(hn_LBD, self._tp, self.sequence_parallel)
        return h_LBD, self._tp, dist.get_rank(self._tp) * w_VD.shape[0]

    def token_loss(self, logits_LBV: torch.Tensor, targets_BL: torch.Tensor) -> torch.Tensor:
        """megatron-core's vocab-parallel cross-entropy (fp32) → loss_BL.

        It reads megatron-core's global TP group (its API takes none; init_groups set it to the
        group here) and overwrites its input in place, so fp32 logits are copied first.
        """
        if self.tp_size == 1:
            return super().token_loss(logits_LBV, targets_BL)
        logits32_LBV = logits_LBV.float()
        if logits32_LBV is logits_LBV:
            logits32_LBV = logits_LBV.clone()
        return vocab_parallel_cross_entropy(logits32_LBV, targets_BL.t().contiguous()).t()


@dataclass(frozen=True)
class ShardShapeFactory(LayerFactory):
    """Plain layers with one rank's shapes (TP, EP, ETP): per-rank parameter counts without any process group."""

    ep_size: int = 1
    etp_size: int = 1

    def column(self, in_features: int, out_features: int, bias: bool = False) -> nn.Module:
        return nn.Linear(in_features, out_features // self.tp_size, bias=bias)

    def row(self, in_features: int, out_features: int) -> nn.Module:
        return nn.Linear(in_features // self.tp_size, out_features, bias=False)

    def embedding(self, vocab_size: int, dim: int) -> nn.Module:
        return nn.Embedding(vocab_size // self.tp_size, dim)

    def lm_head(self, dim: int, vocab_size: int, tied: bool) -> nn.Module:
        return super().lm_head(dim, vocab_size // self.tp_size, tied)

    def experts(self, num_experts: int, dim: int, hidden: int) -> nn.Module:
        return GroupedExperts(num_experts, dim, hidden, ep=(0, self.ep_size), etp=(0, self.etp_size))

    def lory_experts(self, num_experts: int, dim: int, hidden: int) -> nn.Module:
        from megamoe.model.moe.lory import LoryExperts

        return LoryExperts(num_experts, dim, hidden, ep=(0, self.ep_size))
