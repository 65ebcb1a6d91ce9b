"""Router health over training (logging.router_health): one record per optimizer step.

Shape legend: T routed tokens, E experts, P GRU state width.
The trainer appends each record to <run_dir>/router_health.jsonl (rank 0; truncated on resume like
metrics.jsonl, so a resumed run's repeated steps appear once):

* grad/<group>: the pre-clip norm of the data-parallel mean gradient of a parameter group, over all
  layers: `router` (each layer's E × d or E × p router), `proj` (RMoE's d → p projectors), `gru`
  (the shared GRU cell), `experts`, `other`, and `all` (what the trainer clips);
* train/grad_norm: the engine's own pre-clip global norm (equals grad/all);
* L<i>/logit_std: the std of the router logits across experts, mean over tokens;
* L<i>/entropy: the routing distribution's entropy (nats; ln E is uniform), mean over tokens;
* L<i>/top1: the mean top-1 routing probability;
* L<i>/h_abs, L<i>/h_sat, L<i>/h_spread: RMoE: mean |h| of the GRU state after the layer, the share
  of its entries with |h| > 0.9 (a tanh-bounded state near ±1 has saturated), and the std of h over
  tokens (mean over its P entries): how much the state, and so the routing, depends on the token;
* L<i>/update_gate, L<i>/cand_sat: RMoE: the GRU's mean update gate z (1 = keep the old state) and
  the share of candidate entries with |n| > 0.95.
Forward statistics come from the training forward of every micro-batch (mean over them, then over
the data-parallel ranks). Gradients are whole parameters only: config validation refuses layouts
that shard them (tensor, expert or pipeline parallel). The gradient hooks keep an fp32 copy of the
step's gradients, reduced over data parallel once per step: a diagnostic's cost, not a default's.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from megamoe.model.moe.gru import GRUCell
from megamoe.model.moe.scorer import Scorer
from megamoe.parallel.groups import Axis
from megamoe.train.dist import mean_over

GROUPS = (("scorer.router", "router"), ("scorer.proj", "proj"), ("router_gru", "gru"), ("experts", "experts"))
"""(name fragment, group) of the gradient groups; a parameter matching none is in `other`."""


def group_of(name: str) -> str:
    """The gradient group of a parameter name."""
    return next((group for key, group in GROUPS if key in name), "other")


class GradTap:
    """Gradient hooks on every parameter: this rank's gradient of the step, accumulated over micro-batches."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.grads: dict[str, torch.Tensor] = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.register_hook(self._hook(name))

    def _hook(self, name: str):
        def add(grad: torch.Tensor) -> None:
            have = self.grads.get(name)
            if have is None:
                self.grads[name] = grad.detach().float().clone()
            else:
                have += grad.detach()

        return add

    def take(self, dp: Axis) -> dict[str, float]:
        """Pre-clip norm per group and overall of the gradient averaged over dp (collective); resets."""
        squares: dict[str, torch.Tensor] = defaultdict(float)
        for name, param in self.model.named_parameters():
            grad = self.grads.pop(name, None)
            if grad is None and dp.size > 1:  # every rank must join the same reductions
                grad = torch.zeros_like(param, dtype=torch.float32)
            if grad is None:
                continue
            square = mean_over(grad, dp).double().pow(2).sum()
            squares[group_of(name)] += square
            squares["all"] += square
        self.grads.clear()
        return {f"grad/{group}": float(total) ** 0.5 for group, total in squares.items()}


class Probe:
    """Forward hooks on every scorer and the shared GRU; sums statistics until `take`."""

    def __init__(self, model: nn.Module):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = defaultdict(int)
        self.pending: dict[str, torch.Tensor] = {}
        """The GRU's gate statistics of the step in progress, claimed by the scorer that ran it."""
        for name, module in model.named_modules():
            if isinstance(module, Scorer):
                module.register_forward_hook(self._scorer_hook(int(name.split(".")[1])))
            elif isinstance(module, GRUCell):
                module.register_forward_hook(self._gru_hook)

    def _add(self, key: str, value: torch.Tensor) -> None:
        self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.counts[key] += 1

    def _scorer_hook(self, layer: int):
        def hook(module: Scorer, args: tuple, logits_TE: torch.Tensor) -> None:
            if not module.training:
                return
            with torch.no_grad():
                logits_TE = logits_TE.float()
                probs_TE = logits_TE.softmax(-1)
                self._add(f"L{layer}/logit_std", logits_TE.std(-1).mean())
                self._add(f"L{layer}/entropy", -(probs_TE * probs_TE.clamp_min(1e-20).log()).sum(-1).mean())
                self._add(f"L{layer}/top1", probs_TE.max(-1).values.mean())
                state = args[1]
                if module.proj is not None and state.h_TP is not None:
                    h_TP = state.h_TP.float()
                    self._add(f"L{layer}/h_abs", h_TP.abs().mean())
                    self._add(f"L{layer}/h_sat", (h_TP.abs() > 0.9).float().mean())
                    self._add(f"L{layer}/h_spread", h_TP.std(0).mean())
                    for key, value in self.pending.items():
                        self._add(f"L{layer}/{key}", value)
                self.pending.clear()

        return hook

    def _gru_hook(self, module: GRUCell, args: tuple, _h_TP: torch.Tensor) -> None:
        if not module.training:
            return
        with torch.no_grad():
            update_TP, candidate_TP = module.gates(*args)
            self.pending["update_gate"] = update_TP.float().mean()
            self.pending["cand_sat"] = (candidate_TP.abs() > 0.95).float().mean()

    def take(self, dp: Axis) -> dict[str, float]:
        """Means since the last take, averaged over dp (collective; every rank holds the same keys)."""
        keys = sorted(self.sums)
        out = {}
        if keys:
            means = torch.stack([self.sums[k].float() / self.counts[k] for k in keys])
            out = dict(zip(keys, mean_over(means, dp).tolist(), strict=True))
        self.sums.clear()
        self.counts.clear()
        return out


class RouterHealth:
    """Both probes on one model: `take` after a step's backward passes gives its record (collective)."""

    def __init__(self, model: nn.Module):
        self.grads = GradTap(model)
        self.forward = Probe(model)

    def take(self, dp: Axis) -> dict[str, float]:
        """The step's gradient norms and forward statistics; resets both."""
        return {**self.grads.take(dp), **self.forward.take(dp)}
