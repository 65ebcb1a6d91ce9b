"""The group-limited routing report: expert-parallel all-to-all volume counted on each finished run's routing.

Experts sit on EP ranks as the dispatcher places them (a contiguous block of E/EP per rank); sequence b
of the evaluated validation sequences lives on rank b mod EP. The run's final checkpoint routes the
tokens (eval mode, dropless) without groups, and with moe.num_groups = EP and moe.topk_groups = 1 and
EP/2 (where that differs and the kept groups hold k experts). Per token and MoE layer (averaged over both):
- rows: assignments sent to another rank; megamoe's AllToAllDispatcher sends exactly these rows
  (one per (token, expert): its split sizes are the per-rank assignment counts), and as many back;
- ranks: distinct other ranks the token goes to, which is what a dispatcher that sends a token once
  per rank (DeepEP) would send.
The validation loss of each routing is given too (groups imposed on a router trained without them).
Options: ep (default [2, 4, 8]); sequences (default 32): validation sequences evenly spread over the
split, in batches of 8.
Shape legend: L sequence, B batch, K choices per token, R ranks.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from megamoe.analysis.record import set_record_routing
from megamoe.data import PackedSplit, prepare_data
from megamoe.model.moe import MoEFFN
from megamoe.sweep.spec import Sweep
from megamoe.train.evaluate import spread_batches
from megamoe.train.export import load_run_model
from megamoe.train.run import load_run_config

HEADER = [
    "| EP | routing | remote rows / token (megamoe's dispatcher) "
    "| remote ranks / token (a per-rank-deduplicating dispatcher) | val loss |",
    "|---|---|---|---|---|",
]


def routings(ep: int, num_experts: int, top_k: int) -> list[tuple[int, int]]:
    """(num_groups, topk_groups) evaluated at one EP: no groups (1, 0), then EP groups keeping 1 and EP/2,
    less EP itself and any whose kept groups hold fewer than k experts (the config would refuse them)."""
    keeps = sorted({1, ep // 2} - {0, ep})
    return [(1, 0)] + [(ep, keep) for keep in keeps if keep * num_experts // ep >= top_k]


def routing_name(groups: int, keep: int) -> str:
    """'no groups', or '4 groups, top-2 groups'."""
    return f"{groups} groups, top-{keep} group{'s' if keep > 1 else ''}" if keep else "no groups"


def remote_counts(choice_LBK: torch.Tensor, ep: int, num_experts: int, first: int = 0) -> tuple[int, int]:
    """Remote rows and remote (token, rank) pairs, summed over tokens: expert e on rank e // (E/EP),
    sequence b (the first + b-th evaluated) on rank (first + b) mod EP."""
    dest_LBK = choice_LBK // (num_experts // ep)
    source_LB1 = ((first + torch.arange(choice_LBK.shape[1])) % ep)[None, :, None]
    rows = int((dest_LBK != source_LB1).sum())
    hit_LBR = torch.zeros(*dest_LBK.shape[:2], ep, dtype=torch.bool).scatter(2, dest_LBK, True)
    hit_LBR.scatter_(2, source_LB1.expand(*dest_LBK.shape[:2], 1), False)
    return rows, int(hit_LBR.sum())


def set_groups(model: nn.Module, groups: int, keep: int) -> None:
    """Route every MoE block with num_groups / topk_groups, dropless in evaluation."""
    for module in model.modules():
        if isinstance(module, MoEFFN):
            module.cfg = dataclasses.replace(module.cfg, num_groups=groups, topk_groups=keep, eval_capacity_factor=0.0)


@torch.no_grad()
def volume(model: nn.Module, split: PackedSplit, seq_len: int, batches: list, ep: int) -> dict[str, float]:
    """Mean remote rows and remote ranks per token and MoE layer, and the mean token loss."""
    rows, ranks, tokens, loss_sum, seen = 0, 0, 0, 0.0, 0
    set_record_routing(model, True)
    try:
        for ids in batches:
            batch = split.batch(ids, seq_len)
            out = model(batch.tokens_BL, batch.targets_BL)
            for moe in out.moe.values():
                choice_LBK = moe.record["choice_LBK"]
                r, k = remote_counts(choice_LBK, ep, model.moe_cfg.num_experts, seen)
                rows, ranks, tokens = rows + r, ranks + k, tokens + choice_LBK.shape[0] * choice_LBK.shape[1]
            loss_sum, seen = loss_sum + float(out.loss) * len(ids), seen + len(ids)
    finally:
        set_record_routing(model, False)
    return {"rows": rows / tokens, "ranks": ranks / tokens, "loss": loss_sum / seen}


def run_table(run_dir: Path, ep: list[int], sequences: int) -> list[str]:
    """One run's table: a line on what was counted, then a row per (EP, routing)."""
    cfg = load_run_config(str(run_dir), [])
    model, meta = load_run_model(run_dir)
    split = prepare_data(cfg.data, progress=False).split("val")
    batches = spread_batches(split, cfg.model.seq_len, sequences, 8)
    experts, k, count = cfg.moe.num_experts, cfg.moe.top_k, sum(len(b) for b in batches)
    lines = [f"{experts} experts, top-{k}, step {meta['step']}: {count} validation sequences of "
             f"{cfg.model.seq_len} tokens.", "", *HEADER]  # fmt: skip
    for size in (e for e in ep if experts % e == 0):  # contiguous blocks need EP to divide the experts
        for groups, keep in routings(size, experts, k):
            set_groups(model, groups, keep)
            v = volume(model, split, cfg.model.seq_len, batches, size)
            name = routing_name(groups, keep)
            lines.append(f"| {size} | {name} | {v['rows']:.3f} | {v['ranks']:.3f} | {v['loss']:.4f} |")
    return lines


def report(sweep: Sweep, rows: list[dict], out_dir: Path, ep: list | tuple = (2, 4, 8), sequences: int = 32) -> str:
    """Per finished run: remote rows and ranks per token and the val loss, per EP and routing."""
    runs = {run.name: run for run in sweep.runs}
    lines = [
        "## All-to-all volume with and without group-limited routing",
        "",
        "Sequence b lives on EP rank b mod EP; experts sit on ranks in contiguous blocks, as the dispatcher",
        "places them. Groups are imposed at evaluation with `moe.num_groups` = EP (eval mode, dropless).",
        "",
    ]
    for row in rows:
        run = runs[row["run"]]
        if run.cfg.moe.routing != "topk":
            lines += [f"### {row['run']}: not token-choice top-k routing, skipped", ""]
            continue
        lines += [f"### {row['run']}", "", *run_table(run.run_dir, [int(e) for e in ep], sequences), ""]
    return "\n".join(lines)
