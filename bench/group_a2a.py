"""Expert-parallel all-to-all volume with and without group-limited routing, counted from a run's real routing.

Usage: python bench/group_a2a.py RUN_DIR [--ep 2 4] [--sequences 32]
Experts sit on EP ranks as the dispatcher places them (a contiguous block of E/EP per rank); sequence b
of the validation batches lives on rank b mod EP. The run's router routes the tokens (eval mode,
dropless) without groups, and with moe.num_groups = EP and moe.topk_groups = 1 (and EP/2). Per token:
- rows: assignments sent to another rank; megamoe's AllToAllDispatcher sends exactly these rows
  (one per (token, expert): its split sizes are the per-rank assignment counts), and as many back;
- ranks: distinct other ranks the token goes to, which is what a dispatcher that sends a token once
  per rank (DeepEP) would send.
The validation loss of each routing is printed too (groups imposed on a router trained without them).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import torch

from megamoe.analysis.record import set_record_routing
from megamoe.data import prepare_data
from megamoe.model.moe import MoEFFN
from megamoe.train.evaluate import spread_batches
from megamoe.train.export import load_run_model
from megamoe.train.run import load_run_config


def set_groups(model, groups: int, keep: int) -> None:
    """Route every MoE block with num_groups / topk_groups."""
    for module in model.modules():
        if isinstance(module, MoEFFN):
            module.cfg = dataclasses.replace(module.cfg, num_groups=groups, topk_groups=keep)


@torch.no_grad()
def volume(model, split, seq_len: int, batches, ep: int, num_experts: int) -> dict[str, float]:
    """Mean remote rows and remote ranks per token (over layers), and the mean loss."""
    rows, ranks, tokens, loss = 0.0, 0.0, 0, []
    set_record_routing(model, True)
    for ids in batches:
        batch = split.batch(ids, seq_len)
        out = model(batch.tokens_BL, batch.targets_BL)
        loss.append(float(out.loss))
        for moe in out.moe.values():
            choice_LBK = moe.record["choice_LBK"]
            dest_LBK = choice_LBK // (num_experts // ep)
            source_LB1 = (torch.arange(choice_LBK.shape[1]) % ep)[None, :, None]
            remote_LBK = dest_LBK != source_LB1
            rows += float(remote_LBK.sum())
            hit_LBR = torch.zeros(*dest_LBK.shape[:2], ep, dtype=torch.bool).scatter(2, dest_LBK, True)
            hit_LBR.scatter_(2, source_LB1.expand(*dest_LBK.shape[:2], 1), False)
            ranks += float(hit_LBR.sum())
            tokens += choice_LBK.shape[0] * choice_LBK.shape[1]
    set_record_routing(model, False)
    return {"rows": rows / tokens, "ranks": ranks / tokens, "loss": float(np.mean(loss))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--ep", type=int, nargs="+", default=[2, 4])
    p.add_argument("--sequences", type=int, default=32)
    args = p.parse_args()
    cfg = load_run_config(str(args.run_dir), [])
    model, _ = load_run_model(args.run_dir)
    split = prepare_data(cfg.data, progress=False).split("val")
    batches = spread_batches(split, cfg.model.seq_len, args.sequences, 8)
    experts, k = cfg.moe.num_experts, cfg.moe.top_k
    print(f"{args.run_dir}: {experts} experts, top-{k}, {args.sequences} validation sequences")
    print("| EP | routing | remote rows / token (megamoe) | remote ranks / token (per-rank dedup) | val loss |")
    print("|---|---|---|---|---|")
    for ep in args.ep:
        for keep in sorted({0, 1, ep // 2} - {ep} if ep > 2 else {0, 1}):
            if keep and keep * experts // ep < k:  # the kept groups must hold k experts (config validation)
                continue
            set_groups(model, ep if keep else 1, keep)
            v = volume(model, split, cfg.model.seq_len, batches, ep, experts)
            name = f"groups={ep}, topk_groups={keep}" if keep else "no groups"
            print(f"| {ep} | {name} | {v['rows']:.3f} | {v['ranks']:.3f} | {v['loss']:.4f} |")


if __name__ == "__main__":
    main()
