"""One optimizer step's MoE losses and routing statistics: summed over micro-batches, reduced over ranks.

Keys stay bounded: per MoE layer a fixed set of aggregates (moe/L<i>/...), plus model-wide ones
(moe/...); tokens per expert only with moe.log_per_expert. Statistics are sums over distinct tokens
(every rank routes distinct tokens), so one all-reduce (sum) over the world gives the global batch;
a loss value is identical on the TP ranks of a micro-batch, so its world sum / world size is its
mean over the data-parallel ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megamoe.config import MoEConfig
from megamoe.model.moe import MoELayerOutput, RoutingStats
from megamoe.model.moe.stats import POSITION_BUCKETS

LOSS_NAMES = ("balance", "z")


class MoEMetrics:
    """Accumulator for one optimizer step."""

    def __init__(self, cfg: MoEConfig, layers: list[int] | None = None, pp: int = 1):
        self.cfg, self.pp = cfg, pp
        self.micro_batches = 0
        self.sums: dict[int, torch.Tensor] = {}
        self.layers = layers
        """Every MoE block of the model: a pipeline stage reports zeros for the blocks it does not hold."""
        self.requested: dict[int, torch.Tensor] = {}
        """After reduce(): per layer, the tokens that chose each expert (before capacity) over the global batch."""

    def add(self, moe: dict[int, MoELayerOutput]) -> None:
        """Fold in one micro-batch's per-layer outputs."""
        self.micro_batches += 1
        for layer, out in moe.items():
            losses = [float(out.losses[n].detach()) if n in out.losses else 0.0 for n in LOSS_NAMES]
            vec = torch.cat([torch.tensor(losses, dtype=torch.float64), out.stats.to_vector()])
            self.sums[layer] = self.sums[layer] + vec if layer in self.sums else vec

    def reduce(self) -> dict[str, float]:
        """All metrics of the step (collective when distributed)."""
        if not self.sums and not self.layers:
            return {}
        layers = sorted(self.sums) if self.layers is None else self.layers
        width = len(LOSS_NAMES) + RoutingStats.vector_size(self.cfg.num_experts)
        zeros = torch.zeros(width, dtype=torch.float64)
        packed = torch.stack([self.sums.get(layer, zeros) for layer in layers])
        world = 1
        if dist.is_initialized():
            dist.all_reduce(packed)
            world = dist.get_world_size() // self.pp  # a layer's losses come from one pipeline stage
        metrics: dict[str, float] = {}
        for layer, vec in zip(layers, packed):
            losses = vec[: len(LOSS_NAMES)] / (self.micro_batches * world)
            stats = RoutingStats.from_vector(vec[len(LOSS_NAMES) :], self.cfg.num_experts)
            self.requested[layer] = stats.requested_E
            metrics |= self._layer(layer, losses, stats)
        return metrics | self._overall(metrics, layers)

    def _layer(self, layer: int, losses: torch.Tensor, stats: RoutingStats) -> dict[str, float]:
        """Aggregates of one layer."""
        prefix, load = f"moe/L{layer}", stats.load_E
        mean = load.mean().clamp_min(1e-12)
        out = {f"{prefix}/{name}": float(v) for name, v in zip(LOSS_NAMES, losses)}
        out[f"{prefix}/load_cv"] = float(load.std(unbiased=False) / mean)
        out[f"{prefix}/load_max"] = float(load.max() / mean)
        out[f"{prefix}/load_min"] = float(load.min() / mean)
        out[f"{prefix}/dead"] = float((load == 0).sum())
        out[f"{prefix}/utilization"] = float((stats.active_E > 0).double().mean())
        tokens = stats.tokens_P.sum().clamp_min(1)
        requested = stats.requested_E.sum().clamp_min(1)
        out[f"{prefix}/drop"] = (
            float(1 - load.sum() / requested)
            if self.cfg.routing == "topk"
            else float(stats.dropped_any_P.sum() / tokens)
        )
        for q in range(POSITION_BUCKETS):
            out[f"{prefix}/drop_q{q + 1}"] = float(stats.dropped_any_P[q] / stats.tokens_P[q].clamp_min(1))
        out[f"{prefix}/entropy"] = float(stats.entropy / tokens)
        if self.cfg.log_per_expert:
            out |= {f"{prefix}/tokens/e{e}": float(v) for e, v in enumerate(load / load.sum().clamp_min(1))}
        return out

    @staticmethod
    def _overall(metrics: dict[str, float], layers: list[int]) -> dict[str, float]:
        """Model-wide aggregates over the MoE layers."""
        pick = lambda key: [metrics[f"moe/L{layer}/{key}"] for layer in layers]  # noqa: E731
        return {
            "moe/aux_loss": sum(pick("balance")) + sum(pick("z")),
            "moe/drop": sum(pick("drop")) / len(layers),
            "moe/load_cv_max": max(pick("load_cv")),
            "moe/dead": sum(pick("dead")),
            "moe/utilization": sum(pick("utilization")) / len(layers),
        }
