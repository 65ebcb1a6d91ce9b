"""Router health over training: gradient norms, logit scale, routing entropy and RMoE's GRU saturation per step.

Usage: python -m bench.router_health OUT.jsonl [--gru-bias-one] [CONFIG] [key=value ...]
       python -m bench.router_health --summary OUT.jsonl ...   (a table of each file at a few steps)
Trains one single-process run with megamoe's own Trainer (the same code path as `megamoe train`) and
appends one JSON record per optimizer step to OUT.jsonl:

* grad/<group>: the pre-clip gradient norm of a parameter group, summed over layers: `router` (the
  layer's E × d or E × p router), `proj` (RMoE's d → p projectors), `gru` (the shared GRU cell),
  `experts`, `other`, and `all` (what the trainer clips);
* L<i>/logit_std: the std of the router logits across experts, mean over tokens;
* L<i>/entropy: the routing distribution's entropy (nats; ln E is uniform), mean over tokens;
* L<i>/top1: the mean top-1 routing probability;
* L<i>/h_abs, L<i>/h_sat, L<i>/h_spread: RMoE: mean |h| of the GRU state after the layer, the share
  of its entries with |h| > 0.9 (a tanh-bounded state near ±1 has saturated), and the std of h over
  tokens (mean over its P entries): how much the state, and so the routing, depends on the token;
* L<i>/update_gate, L<i>/cand_sat: RMoE: the GRU's mean update gate z (1 = keep the old state) and
  the share of candidate entries with |n| > 0.95.
--gru-bias-one starts the GRU's biases at 1 instead of 0, as megamoe's init did until the RMoE study
(docs/results.md) found it, so the before and after can be measured side by side.
Statistics come from the training forward of every micro-batch (averaged over them); the run's own
metrics.jsonl (loss, evaluation) is written to train.run_dir as usual.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

from megamoe.model.moe.gru import GRUCell
from megamoe.model.moe.scorer import Scorer

GROUPS = (("scorer.router", "router"), ("scorer.proj", "proj"), ("router_gru", "gru"), ("experts", "experts"))


def group_of(name: str) -> str:
    """The report group of a parameter name."""
    return next((group for key, group in GROUPS if key in name), "other")


def grad_norms(model: torch.nn.Module) -> dict[str, float]:
    """Pre-clip gradient norm per group and overall."""
    squares: dict[str, float] = defaultdict(float)
    for name, param in model.named_parameters():
        if param.grad is not None:
            value = float(param.grad.double().pow(2).sum())
            squares[group_of(name)] += value
            squares["all"] += value
    return {f"grad/{group}": total**0.5 for group, total in squares.items()}


class Probe:
    """Forward hooks on every scorer and the shared GRU; sums statistics until `take`."""

    def __init__(self, model: torch.nn.Module):
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        for name, module in model.named_modules():
            if isinstance(module, Scorer):
                layer = int(name.split(".")[1])
                module.register_forward_hook(self._scorer_hook(layer))
            elif isinstance(module, GRUCell):
                module.register_forward_hook(self._gru_hook)

    def _add(self, key: str, value: torch.Tensor) -> None:
        self.sums[key] += float(value)
        self.counts[key] += 1

    def _scorer_hook(self, layer: int):
        def hook(module, args, logits_TE):
            if not module.training:
                return
            with torch.no_grad():
                probs_TE = logits_TE.float().softmax(-1)
                self._add(f"L{layer}/logit_std", logits_TE.float().std(-1).mean())
                self._add(f"L{layer}/entropy", -(probs_TE * probs_TE.clamp_min(1e-20).log()).sum(-1).mean())
                self._add(f"L{layer}/top1", probs_TE.max(-1).values.mean())
                state = args[1]
                if module.proj is not None and state.h_TP is not None:
                    h_TP = state.h_TP.float()
                    self._add(f"L{layer}/h_abs", h_TP.abs().mean())
                    self._add(f"L{layer}/h_sat", (h_TP.abs() > 0.9).float().mean())
                    self._add(f"L{layer}/h_spread", h_TP.std(0).mean())
                    for key in ("update_gate", "cand_sat"):
                        self.sums[f"L{layer}/{key}"] += self.sums.pop(f"pending/{key}", 0.0)
                        self.counts[f"L{layer}/{key}"] += 1

        return hook

    def _gru_hook(self, module, args, _h_TP):
        if not module.training:
            return
        with torch.no_grad():
            update, candidate = module.gates(args[0], args[1])
            self.sums["pending/update_gate"] = float(update.mean())
            self.sums["pending/cand_sat"] = float((candidate.abs() > 0.95).float().mean())

    def take(self) -> dict[str, float]:
        """Means since the last take."""
        out = {key: self.sums[key] / self.counts[key] for key in self.sums if not key.startswith("pending/")}
        self.sums.clear()
        self.counts.clear()
        return out


SUMMARY = (
    "grad/router", "grad/proj", "grad/gru", "grad/all", "logit_std", "entropy", "top1", "h_sat", "h_spread",
    "update_gate",
)  # fmt: skip
"""Columns of --summary: gradient groups as they are, per-layer statistics as their mean over layers."""


def summarize(paths: list[str], at: tuple[int, ...] = (1, 30, 100, 200, 300), window: int = 5) -> None:
    """Print each file's columns at some steps (mean over the `window` steps ending there)."""
    print("| run | step | " + " | ".join(SUMMARY) + " |")
    print("|---|---|" + "---|" * len(SUMMARY))
    for path in paths:
        records = [json.loads(line) for line in Path(path).read_text().splitlines()]
        for step in at:
            chunk = [r for r in records if step - window < r["step"] <= step]
            if not chunk:
                continue
            cells = [_column(chunk, key) for key in SUMMARY]
            print(f"| {Path(path).stem} | {step} | " + " | ".join(cells) + " |")


def _column(records: list[dict], key: str) -> str:
    """Mean of a key (per-layer keys averaged over layers) over records; '—' when absent."""
    values = [v for r in records for k, v in r.items() if k == key or (k.startswith("L") and k.endswith("/" + key))]
    return f"{sum(values) / len(values):.3g}" if values else "—"


def main(argv: list[str]) -> int:
    """Train with the probes attached (one JSON line per step), or print --summary."""
    if argv[:1] == ["--summary"]:
        summarize(argv[1:])
        return 0
    from megamoe.cli.main import setup_logging, split_config_args
    from megamoe.parallel.groups import local_groups
    from megamoe.parallel.layout import resolve_layout
    from megamoe.train.run import load_run_config, setup_run
    from megamoe.train.trainer import Trainer, pick_device

    setup_logging()
    out, legacy = Path(argv[0]), "--gru-bias-one" in argv
    cfg = load_run_config(*split_config_args([a for a in argv[1:] if a != "--gru-bias-one"]))
    groups = local_groups(resolve_layout(cfg, 1), pick_device(cfg.train.device))
    trainer = Trainer(setup_run(cfg, resume=False, progress=False), groups)
    probe = Probe(trainer.model)
    if legacy and trainer.model.router_gru is not None:
        with torch.no_grad():
            for bias in (trainer.model.router_gru.bias_ih, trainer.model.router_gru.bias_hh):
                bias.fill_(1.0)
    step_engine = trainer.engine.step

    with out.open("a") as sink:

        def step() -> float:
            record = {"step": trainer.step + 1, **grad_norms(trainer.model), **probe.take()}
            norm = step_engine()
            record["train/grad_norm"] = norm
            sink.write(json.dumps(record) + "\n")
            sink.flush()
            return norm

        trainer.engine.step = step
        summary = trainer.fit()
    print(f"{out}: {summary['step']} steps, eval ppl {summary.get('eval/ppl', float('nan')):.2f}")
    return 0


if __name__ == "__main__":
    from megamoe.errors import MegamoeError

    try:
        sys.exit(main(sys.argv[1:]))
    except MegamoeError as err:
        sys.exit(f"router_health: error: {err}")
