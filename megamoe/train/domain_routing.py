"""Lory's per-domain average routing weight per layer (the paper's specialization plots), from eval batches.

Shape legend: B batch, L sequence, N segments, E experts, K Lory layers, D domains.
Every token carries the weights its segment was merged with; they are summed per (layer, domain)
and divided by the domain's token count. One bounded scalar per layer summarizes specialization:
the generalized Jensen–Shannon divergence of the domains' average weights (equal domain weights),
H(mean_d p_d) − mean_d H(p_d), in nats: 0 when every domain is routed alike, at most ln min(D, E).
"""

from __future__ import annotations

import torch

from megamoe.model.moe import MoELayerOutput
from megamoe.model.moe.lory import token_weights


def add_domain_routing(
    sums_KDE: torch.Tensor, moe: dict[int, MoELayerOutput], domains_BL: torch.Tensor, weight: float
) -> torch.Tensor:
    """sums_KDE plus this batch's per-token routing weights summed by domain (Lory layers in block order)."""
    layers = [out.segment_weights for _, out in sorted(moe.items()) if out.segment_weights is not None]
    batch, length = domains_BL.shape
    for k, w_NBE in enumerate(layers):
        w_BLE = token_weights(w_NBE, length).double().cpu()
        sums_KDE[k].index_add_(0, domains_BL.flatten().cpu(), weight * w_BLE.reshape(batch * length, -1))
    return sums_KDE


def domain_routing_metrics(
    sums_KDE: torch.Tensor, count_D: torch.Tensor, layers: list[int], domains: list[str]
) -> tuple[dict[str, float], dict]:
    """Scalars (eval/routing/L<i>/domain_js) and the full table {L<i>: {domain: [E weights]}}."""
    present = count_D > 0
    mean_KDE = sums_KDE[:, present] / count_D[present][None, :, None]
    names = [d for d, keep in zip(domains, present.tolist()) if keep]
    metrics, table = {}, {}
    for layer, p_DE in zip(layers, mean_KDE):
        metrics[f"eval/routing/L{layer}/domain_js"] = float(_entropy(p_DE.mean(0)) - _entropy(p_DE).mean())
        table[f"L{layer}"] = {name: [round(float(v), 6) for v in p_E] for name, p_E in zip(names, p_DE)}
    return metrics, table


def _entropy(p_XE: torch.Tensor) -> torch.Tensor:
    """Entropy over the last axis, in nats."""
    return -(p_XE * p_XE.clamp_min(1e-30).log()).sum(-1)
