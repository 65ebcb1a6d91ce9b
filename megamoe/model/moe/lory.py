"""Lory (arXiv 2405.03133): causal segment routing and parameter-space merging of SwiGLU experts.

Shape legend: L sequence, b sequences this rank merges for, D width, N segments per sequence,
T segment length, S = N·b segments, E experts, F expert FFN width (this rank's slice).

Each sequence is cut into segments of T tokens (the last may be shorter). Segment k is routed by
the softmax over all experts of the router applied to segment k−1's mean, so the shift never
crosses sequences. The first segment uses its own mean, detached (`routing_mode: prefix` routes
every segment by the first). All three SwiGLU matrices are merged with the weights, and every
token of the segment goes through the merged FFN. There is no balance loss, no capacity and no
dropping. Segment 1 is not strictly causal: its tokens see the mean of segment 1, which includes
later tokens. The stop-gradient keeps the model from being trained to exploit that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from megamoe.config import ModelConfig, MoEConfig
from megamoe.model.moe.block import MoELayerOutput
from megamoe.model.moe.experts import mark_shards
from megamoe.model.moe.scorer import Scorer
from megamoe.model.moe.state import RoutingState
from megamoe.model.moe.stats import POSITION_BUCKETS, RoutingStats
from megamoe.model.recompute import maybe_checkpoint
from megamoe.ops.lory import merged_swiglu
from megamoe.ops.lory_check import select_merge_impl

if TYPE_CHECKING:
    from megamoe.model.factory import LayerFactory


class LoryExperts(nn.Module):
    """E SwiGLU experts, each split along F over the expert-parallel ranks (this rank holds F/ep of every one)."""

    def __init__(self, num_experts: int, dim: int, hidden: int, ep: tuple[int, int] = (0, 1)):
        super().__init__()
        rank, size = ep
        width = hidden // size
        self.w_gate = nn.Parameter(torch.empty(num_experts, width, dim))
        self.w_up = nn.Parameter(torch.empty(num_experts, width, dim))
        self.w_down = nn.Parameter(torch.empty(num_experts, dim, width))
        for param, f_dim in ((self.w_gate, 1), (self.w_up, 1), (self.w_down, 2)):
            mark_shards(param, ("ep", f_dim, rank, size))
            param.expert = True


class LoryComm:
    """The single-process view of Lory's tokens and expert group (the parallel layer overrides it)."""

    def split(self, x_LBD: torch.Tensor) -> torch.Tensor:
        """Whole sequences this rank merges for (tensor-parallel ranks take distinct sequences)."""
        return x_LBD

    def merge(self, y_LbD: torch.Tensor) -> torch.Tensor:
        """Back to the block's layout."""
        return y_LbD

    def gather(self, x_STD: torch.Tensor, w_SE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Segments and weights of every rank holding a slice of the experts' F."""
        return x_STD, w_SE

    def reduce(self, y_STD: torch.Tensor) -> torch.Tensor:
        """Partial outputs summed over the F slices; each rank keeps its own segments."""
        return y_STD

    def shared_param(self, param: torch.Tensor) -> torch.Tensor:
        """A replicated parameter used on this rank's sequences (its grad is summed over the TP ranks)."""
        return param

    def full_batch(self, w_NbE: torch.Tensor) -> torch.Tensor:
        """Routing weights of the whole micro-batch (for statistics; no gradient)."""
        return w_NbE


@dataclass
class LoryDecode:
    """One Lory layer's routing during incremental decoding."""

    weights_bE: torch.Tensor
    """Routing weights in use for the current segment (prompt mode: for the whole generation)."""
    position: int
    """Tokens seen so far."""
    sum_bD: torch.Tensor
    """Sum of the MoE inputs of the current, unfinished segment (segment mode)."""


def segment_counts(length: int, seg: int, device: torch.device) -> torch.Tensor:
    """Real tokens in each of the ⌈L/T⌉ segments (the last may be short)."""
    n = -(-length // seg)
    return (length - torch.arange(n, device=device) * seg).clamp(max=seg)


def token_weights(w_NBE: torch.Tensor, length: int) -> torch.Tensor:
    """Each token's routing weights (B, L, E): its segment's row of the (N, B, E) segment weights."""
    seg = -(-length // w_NBE.shape[0])
    segment_L = torch.arange(length, device=w_NBE.device) // seg
    return w_NBE.index_select(0, segment_L).transpose(0, 1)


def fp32_softmax(logits_XE: torch.Tensor) -> torch.Tensor:
    """Softmax over experts in at least fp32."""
    return logits_XE.to(torch.promote_types(logits_XE.dtype, torch.float32)).softmax(-1)


class LoryFFN(nn.Module):
    """The Lory MoE layer."""

    def __init__(self, model_cfg: ModelConfig, cfg: MoEConfig, factory: LayerFactory, index: int = 0):
        super().__init__()
        self.cfg, self.index = cfg, index
        self.scorer = Scorer(model_cfg.d_model, cfg)
        hidden = cfg.expert_hidden_size or model_cfg.ffn_hidden
        self.experts = factory.lory_experts(cfg.num_experts, model_cfg.d_model, hidden)
        self.comm = factory.lory_comm()
        self.dense_phase = False
        self.recompute_core = False
        """Selective recompute: the merged SwiGLU keeps only its inputs."""

    def forward(self, x_LBD: torch.Tensor, state: RoutingState | None = None) -> tuple[torch.Tensor, MoELayerOutput]:
        """The layer's output and its statistics (no losses)."""
        state = state or RoutingState()
        x_LbD = self.comm.split(x_LBD)
        if state.cache is not None:
            return self.comm.merge(self._decode(x_LbD, state)), None
        y_LbD, weights_NbE, counts_N = self._segments(x_LbD, state)
        stats = self._stats(weights_NbE.detach(), counts_N)
        return self.comm.merge(y_LbD), MoELayerOutput({}, stats, self.comm.full_batch(weights_NbE.detach()))

    def _segments(self, x_LbD: torch.Tensor, state: RoutingState):
        """Training-style routing over a whole sequence: (y_LbD, weights_NbE, tokens per segment)."""
        length, batch, dim = x_LbD.shape
        seg = min(self.cfg.segment_length, length)
        n = -(-length // seg)
        padded_LbD = x_LbD if n * seg == length else F.pad(x_LbD, (0, 0, 0, 0, 0, n * seg - length))  # pad copies
        x_NTbD = padded_LbD.view(n, seg, batch, dim)
        counts_N = segment_counts(length, seg, x_LbD.device)
        weights_NbE = self.route(x_NTbD.sum(1) / counts_N[:, None, None].to(x_LbD.dtype), state)
        y_STD = self.merged(x_NTbD.permute(0, 2, 1, 3).reshape(n * batch, seg, dim), weights_NbE.reshape(n * batch, -1))
        y_LbD = y_STD.view(n, batch, seg, dim).permute(0, 2, 1, 3).reshape(n * seg, batch, dim)
        return (y_LbD if n * seg == length else y_LbD[:length]), weights_NbE, counts_N  # a slice's backward copies

    def route(self, means_NbD: torch.Tensor, state: RoutingState) -> torch.Tensor:
        """Routing weights per segment: shifted by one segment, the first detached (dense phase: expert 0)."""
        n, batch, dim = means_NbD.shape
        logits_NbE = self.scorer(means_NbD.reshape(-1, dim), state, self.comm.shared_param).view(n, batch, -1)
        probs_NbE = fp32_softmax(logits_NbE)
        if self.dense_phase:  # every segment on expert 0; the router stays in the graph with zero gradient
            return (
                F.one_hot(torch.zeros_like(probs_NbE[..., 0], dtype=torch.long), probs_NbE.shape[-1]).to(
                    probs_NbE.dtype
                )
                + 0 * probs_NbE
            )
        prefix = self.cfg.routing_mode == "prefix"
        rest = probs_NbE[:1].expand(n - 1, -1, -1) if prefix else probs_NbE[:-1]
        return torch.cat([probs_NbE[:1].detach(), rest], 0)

    def inactive_parameters(self) -> int:
        """Expert parameters beyond one merged FFN: a token uses the merge of all, i.e. one expert's worth."""
        expert_params = sum(p.numel() for p in self.experts.parameters())
        return expert_params - expert_params // self.cfg.num_experts

    def merged(self, x_STD: torch.Tensor, w_SE: torch.Tensor) -> torch.Tensor:
        """Every segment through its merged FFN (segments of all F-slice peers gathered, partial sums reduced)."""
        x_STD, w_SE = self.comm.gather(x_STD, w_SE)
        e = self.experts
        impl = select_merge_impl(self.cfg.merge_impl, x_STD, e.w_gate)
        args = (x_STD, w_SE.to(x_STD.dtype), e.w_gate, e.w_up, e.w_down, impl)
        y_STD = maybe_checkpoint(self.recompute_core, merged_swiglu, *args)
        return self.comm.reduce(y_STD)

    def _stats(self, weights_NbE: torch.Tensor, counts_N: torch.Tensor) -> RoutingStats:
        """Soft load (Σ tokens × weight per expert), utilization (segments with weight > 2/E), entropy."""
        batch, num_experts = weights_NbE.shape[1:]
        tokens_N1 = counts_N[:, None].double()
        load_E = (weights_NbE.double() * tokens_N1[..., None]).sum((0, 1))
        active_E = (weights_NbE > 2.0 / num_experts).sum((0, 1)).double()
        entropy = (-(weights_NbE * weights_NbE.clamp_min(1e-20).log()).sum(-1).double() * tokens_N1).sum()
        length = int(counts_N.sum())
        bucket_L = torch.arange(length, device=counts_N.device) * POSITION_BUCKETS // length
        tokens_P = torch.bincount(bucket_L, minlength=POSITION_BUCKETS).double() * batch
        zero_P = torch.zeros(POSITION_BUCKETS, dtype=torch.float64, device=tokens_P.device)
        return RoutingStats(load_E, load_E, tokens_P, zero_P, zero_P, entropy, active_E)

    def _decode(self, x_LbD: torch.Tensor, state: RoutingState) -> torch.Tensor:
        """Incremental decoding: prompt routing (weights fixed at prefill) or per-segment re-routing."""
        cache = state.cache.lory
        if self.index not in cache:
            return self._prefill(x_LbD, state, cache)
        dec = cache[self.index]
        if self.cfg.generate_routing == "prompt":
            return self._through_merged(x_LbD, dec.weights_bE)
        return self._decode_segments(x_LbD, dec, state)

    def _prefill(self, x_LbD: torch.Tensor, state: RoutingState, cache: dict) -> torch.Tensor:
        """The prompt: routed once from its mean (prompt mode), or training-style by segments."""
        length, seg = x_LbD.shape[0], self.cfg.segment_length
        start = (length - 1) // seg * seg  # first token of the prompt's last (current) segment
        if self.cfg.generate_routing == "prompt" or length <= seg:
            weights_bE = fp32_softmax(self.scorer(x_LbD.mean(0), state, self.comm.shared_param))
            y_LbD = self._through_merged(x_LbD, weights_bE)
        else:
            y_LbD, weights_NbE, _ = self._segments(x_LbD, state)
            weights_bE = weights_NbE[-1]
        cache[self.index] = LoryDecode(weights_bE, length, x_LbD[start:].sum(0))
        return y_LbD

    def _through_merged(self, x_LbD: torch.Tensor, weights_bE: torch.Tensor) -> torch.Tensor:
        """All tokens of each sequence through the sequence's merged FFN."""
        y_bLD = self.merged(x_LbD.transpose(0, 1), weights_bE)
        return y_bLD.transpose(0, 1)

    def _decode_segments(self, x_LbD: torch.Tensor, dec: LoryDecode, state: RoutingState) -> torch.Tensor:
        """One token per step: at each segment boundary re-route from the finished segment's mean."""
        seg, outs = self.cfg.segment_length, []
        for x_1bD in x_LbD.split(1):
            if dec.position % seg == 0:  # a segment just finished: it routes the one that starts
                mean_bD = dec.sum_bD / seg
                dec.weights_bE = fp32_softmax(self.scorer(mean_bD, state, self.comm.shared_param))
                dec.sum_bD = torch.zeros_like(dec.sum_bD)
            outs.append(self._through_merged(x_1bD, dec.weights_bE))
            dec.sum_bD = dec.sum_bD + x_1bD[0]
            dec.position += 1
        return torch.cat(outs)
