"""Pipeline parallelism: the model's blocks split into chunks run by torch.distributed.pipelining.

Shape legend: B micro-batch, L sequence (this rank's slice under sequence parallelism), D width,
V vocabulary (this TP rank's), T tokens a MoE block routes, P RMoE's GRU state width.

Each rank builds only what its chunks need (`stage_part`; the init by name gives every tensor its
single-process value): the embedding on the first chunk, the final norm and LM head on the last,
its blocks, and RMoE's shared GRU on every rank. Between chunks travel the hidden states, the
micro-batch's sample ids (so every chunk draws GRIN's and the jitter's layout-independent routing
noise from the same (seed, step, layer, sample) streams) and, for RMoE, the GRU state. What crosses
stages stays exact:

* MoE auxiliary losses: the last stage's loss function never sees them, so each chunk attaches its
  blocks' aux loss to its output hidden state with an identity whose backward also sends the loss's
  gradient into it (megatron-core's MoEAuxLossAutoScaler);
* tied embeddings: the last stage keeps a copy of the embedding matrix for its head; the copies'
  gradients are summed over the first and last stage (`Replica`);
* RMoE: every pipeline rank keeps the shared GRU; its gradient is summed over the pipeline;
* the loss of a micro-batch is its mean token loss / m (m micro-batches), and each aux loss gets
  gradient 1/m: the single-process step's Σ (loss + aux)/m, with no further gradient scaling.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from megamoe.config import Config
from megamoe.model.moe.noise import RoutingContext
from megamoe.model.moe.state import RoutingState
from megamoe.model.transformer import Part, Transformer
from megamoe.parallel.groups import ParallelGroups
from megamoe.parallel.stages import chunks_of_rank, split_layers


class _AuxGrad(torch.autograd.Function):
    """Identity on h; its backward also gives the auxiliary loss the gradient `scale`."""

    @staticmethod
    def forward(ctx, h_LBD, aux, scale: float):
        ctx.save_for_backward(aux)
        ctx.scale = scale
        return h_LBD.view_as(h_LBD)

    @staticmethod
    def backward(ctx, grad_LBD):
        (aux,) = ctx.saved_tensors
        return grad_LBD, torch.full_like(aux, ctx.scale), None


@dataclass
class Replica:
    """A parameter kept on several pipeline ranks: its gradient is summed over `group`; `owner` saves it."""

    name: str
    group: dist.ProcessGroup | None
    owner: bool


class Chunk(nn.Module):
    """Blocks [start, stop) of a pruned model, with the embedding (first chunk) or norm and head (last)."""

    def __init__(self, model: Transformer, start: int, stop: int, first: bool, last: bool, micro_batches: int):
        super().__init__()
        self.model, self.start, self.stop, self.first, self.last = model, start, stop, first, last
        self.micro_batches = micro_batches
        self.seed, self.step = 0, 0
        self.outputs: list[dict] = []
        """Per micro-batch (in order): {block index: MoELayerOutput} of this chunk's MoE blocks."""

    def forward(self, x, ids_B: torch.Tensor, gru_TP: torch.Tensor | None = None):
        """Embedding (first) → blocks → norm and head (last): logits_LBV (normed h_LBD if the loss is fused),
        else (h_LBD, ids_B[, gru_TP])."""
        model = self.model
        h_LBD = model.embed(x) if self.first else x
        ctx = RoutingContext(self.seed, self.step, tuple(int(i) for i in ids_B.tolist()))
        state = RoutingState(ctx, model.router_gru, h_TP=gru_TP)
        h_LBD, moe = model.run_blocks(h_LBD, state, range(self.start, self.stop))
        aux = [loss for out in moe.values() for loss in out.losses.values()]
        self.outputs.append(moe)
        if aux and torch.is_grad_enabled():
            h_LBD = _AuxGrad.apply(h_LBD, torch.stack(aux).sum(), 1.0 / self.micro_batches)
        if self.last:  # the normed hidden states where the loss function fuses the head with the loss
            hn_LBD = model.norm(h_LBD)
            return hn_LBD if model.loss_chunk_tokens > 0 else model.lm_head(hn_LBD, model.tied_weight)
        if model.router_gru is None:
            return h_LBD, ids_B
        gru_TP = state.h_TP if state.h_TP is not None else h_LBD.new_zeros(1, model.moe_cfg.gru_hidden)
        return h_LBD, ids_B, gru_TP


@dataclass
class Plan:
    """This rank's share of the pipeline."""

    chunks: list[Chunk]
    bounds: list[tuple[int, int]]
    """[start, stop) blocks of every chunk of the model (all ranks)."""
    replicas: list[Replica] = field(default_factory=list)


def _my_chunks(cfg: Config, pp_rank: int, pp: int) -> tuple[list[tuple[int, int]], list[int]]:
    """[start, stop) blocks of every chunk of the model, and the chunks pipeline rank pp_rank holds."""
    vpp = cfg.parallel.virtual_stages
    return split_layers(cfg, pp * vpp), chunks_of_rank(pp_rank, pp, vpp)


def stage_part(cfg: Config, pp_rank: int, pp: int) -> Part:
    """What pipeline rank pp_rank builds: its chunks' blocks, the embedding (first chunk, or the last's tied
    copy) and the final norm and head (last chunk); nothing else is ever allocated."""
    bounds, mine = _my_chunks(cfg, pp_rank, pp)
    first, last = 0 in mine, len(bounds) - 1 in mine
    blocks = frozenset(i for c in mine for i in range(*bounds[c]))
    return Part(blocks, embed=first or (last and cfg.model.tie_embeddings), head=last)


def plan_stages(model: Transformer, cfg: Config, groups: ParallelGroups) -> Plan:
    """This rank's chunks of a model built with stage_part's Part, and the parameters it shares with other stages."""
    bounds, mine = _my_chunks(cfg, groups.pp.rank, groups.pp.size)
    first, last = 0 in mine, len(bounds) - 1 in mine
    chunks = [Chunk(model, *bounds[c], c == 0, c == len(bounds) - 1, groups.layout.micro_batches) for c in mine]
    return Plan(chunks, bounds, _replicas(model, groups, first, last, cfg.model.tie_embeddings))


def _replicas(model: Transformer, groups: ParallelGroups, first: bool, last: bool, tied: bool) -> list[Replica]:
    """The tied embedding (first and last stage) and RMoE's GRU (every stage)."""
    out = []
    if tied:
        group = _ends_group(groups)
        if first or last:
            out.append(Replica("embed.weight", group, owner=first))
    if model.router_gru is not None:
        owner = groups.pp.rank == 0
        out += [Replica(f"router_gru.{n}", groups.pp.group, owner) for n, _ in model.router_gru.named_parameters()]
    return out


def _ends_group(groups: ParallelGroups) -> dist.ProcessGroup:
    """The group of this pipeline's first and last stage ranks (every rank creates every pipeline's group)."""
    per_stage, pp = groups.world // groups.pp.size, groups.pp.size
    mine = None
    for position in range(per_stage):
        group = dist.new_group([position, position + per_stage * (pp - 1)])
        if groups.rank in (position, position + per_stage * (pp - 1)):
            mine = group
    return mine


def pp_stage_of(plan: Plan, chunk: Chunk) -> int:
    """The pipeline stage index of one of this rank's chunks."""
    return plan.bounds.index((chunk.start, chunk.stop))
