"""The group_a2a report end to end: a tiny sweep of a top-2-of-8 run (and a dense one), collected with it,
checked against the run's own evaluation and routing recorded independently."""

from __future__ import annotations

import dataclasses

import pytest

from megamoe.analysis.record import record_routing
from megamoe.data import prepare_data
from megamoe.model.moe import MoEFFN
from megamoe.train.evaluate import spread_batches
from megamoe.train.export import load_run_model
from megamoe.train.metrics import read_metrics
from megamoe.train.run import load_run_config
from tests.e2e.test_sweep_budgets import overrides
from tests.e2e.test_sweep_reports import sweep_and_collect

EXPERTS, TOP_K, EP = 8, 2, [1, 2, 4, 8]
TOP2 = ["moe.routing=topk", f"moe.num_experts={EXPERTS}", f"moe.top_k={TOP_K}", "moe.capacity_factor=0",
        "moe.eval_capacity_factor=0"]  # fmt: skip
SEQUENCES = 12  # = micro_batch_size 2 × eval_batches 6: the run's own evaluation reads them; batches of 8 and 4


@pytest.fixture(scope="module")
def collected(data_cache, tiny_data, tmp_path_factory):
    """The sweep {dense, top2} at 6 steps, trained and collected with the group_a2a report."""
    root = tmp_path_factory.mktemp("group_a2a")
    spec = {"name": "g", "out": str(root), "overrides": [*overrides(data_cache), "train.eval_batches=6"],
            "variants": {"dense": [], "top2": TOP2},
            "reports": [{"group_a2a": {"ep": EP, "sequences": SEQUENCES}}]}  # fmt: skip
    return sweep_and_collect(root, spec)


def table(report: str) -> dict[tuple[int, str], tuple[float, float, float]]:
    """(EP, routing) → (remote rows / token, remote ranks / token, val loss), from the top2 run's table."""
    section = report.split("### top2\n", 1)[1]
    out = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("|") and cells[0].isdigit():
            out[int(cells[0]), cells[1]] = tuple(float(c) for c in cells[2:])
    return out


def independent_counts(run_dir, ep: int, groups: int = 1, keep: int = 0) -> tuple[float, float]:
    """Remote rows and ranks per token from megamoe.analysis.record's recording, counted token by token:
    the j-th evaluated sequence on rank j mod EP, expert e on rank ⌊e·EP/E⌋."""
    cfg = load_run_config(str(run_dir), [])
    model, _ = load_run_model(run_dir)
    for module in model.modules():
        if isinstance(module, MoEFFN):
            module.cfg = dataclasses.replace(module.cfg, num_groups=groups, topk_groups=keep)
    split = prepare_data(cfg.data, progress=False).split("val")
    batches = spread_batches(split, cfg.model.seq_len, SEQUENCES, 8)
    rec = record_routing(model, split, cfg.model.seq_len, batches, {})
    order = {int(s): j for j, s in enumerate(int(i) for b in batches for i in b)}
    rows = ranks = tokens = 0
    for parts in rec.layers.values():
        for t, choices in enumerate(parts["choice_TK"]):
            home = order[int(rec.sequence_T[t])] % ep
            dests = [int(e) * ep // EXPERTS for e in choices]
            rows += sum(d != home for d in dests)
            ranks += len(set(dests) - {home})
            tokens += 1
    return rows / tokens, ranks / tokens


def test_report_is_in_results_md_and_skips_the_dense_run(collected):
    report = (collected / "report_group_a2a.md").read_text()
    assert (collected / "results.md").read_text().endswith("\n" + report)
    assert "### dense: not token-choice top-k routing, skipped" in report
    assert f"{EXPERTS} experts, top-{TOP_K}, step 6: {SEQUENCES} validation sequences of 32 tokens." in report
    assert list(table(report)) == [
        (1, "no groups"), (2, "no groups"), (2, "2 groups, top-1 group"), (4, "no groups"),
        (4, "4 groups, top-1 group"), (4, "4 groups, top-2 groups"), (8, "no groups"), (8, "8 groups, top-4 groups"),
    ]  # fmt: skip


def test_counts_are_bounded(collected):
    rows = table((collected / "report_group_a2a.md").read_text())
    assert rows[1, "no groups"][:2] == (0.0, 0.0)
    for (ep, name), (remote_rows, remote_ranks, _) in rows.items():
        assert remote_ranks <= remote_rows <= TOP_K
        assert remote_ranks <= min(TOP_K, ep - 1)
        if name == f"{ep} groups, top-1 group":
            assert remote_ranks <= 1
    assert rows[8, "no groups"][0] > 0


def test_counts_match_the_recorded_routing(collected):
    rows = table((collected / "report_group_a2a.md").read_text())
    for ep, name, groups, keep in ((4, "no groups", 1, 0), (2, "no groups", 1, 0), (4, "4 groups, top-1 group", 4, 1)):
        want = independent_counts(collected / "top2", ep, groups, keep)
        assert rows[ep, name][:2] == tuple(pytest.approx(w, abs=5e-4) for w in want), (ep, name)


def test_val_loss_without_groups_is_the_runs_own_final_eval(collected):
    rows = table((collected / "report_group_a2a.md").read_text())
    final = [r for r in read_metrics(collected / "top2") if "eval/loss" in r][-1]["eval/loss"]
    for ep in EP:
        assert rows[ep, "no groups"][2] == pytest.approx(final, abs=1e-4)
