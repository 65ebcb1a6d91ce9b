"""docs/results.md's crossover blocks are what `--collect` makes of the study's record (issue 18, part 5).

The record (docs/records/crossover) holds every finished run of configs/sweeps/crossover.yaml without
its checkpoints. A collect on a fresh working directory restores it and writes the report; every
block docs/results.md marks as taken from it (`<!-- report: ... -->`, written by
tools/sync_results.py) must be the report's block line for line: the budget table, the list of
where each variant overtakes dense, the paired comparisons and Lory's domain specialization.
"""

from __future__ import annotations

from tests.e2e.test_train import REPO, cli
from tools.sync_results import marked_blocks, sync

SWEEP = REPO / "configs" / "sweeps" / "crossover.yaml"
RESULTS = REPO / "docs" / "results.md"
BLOCKS = {
    "## Budget crossover",
    "Where each variant overtakes dense",
    "### Paired comparisons",
    "### Lory: routing weight by domain",
}


def test_the_crossover_blocks_in_results_md_regenerate_from_the_record(tmp_path):
    res = cli("sweep", str(SWEEP), "--collect", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "restored" in res.stdout, res.stdout
    report = (tmp_path / "runs" / "sweeps" / "crossover" / "report_crossover.md").read_text()
    docs = RESULTS.read_text()
    assert {anchor for anchor, _, _ in marked_blocks(docs)} >= BLOCKS, "docs/results.md lost a report marker"
    synced, changed = sync(report, docs, "docs/results.md")
    assert not changed, (
        f"docs/results.md's blocks after {changed} differ from the record's report; run tools/sync_results.py on it"
    )
    assert synced == docs
