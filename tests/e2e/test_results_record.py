"""docs/results.md's crossover table is what `--collect` makes of the study's record (issue 18, part 5).

The record (docs/records/crossover) holds every finished run of configs/sweeps/crossover.yaml without
its checkpoints. A collect on a fresh working directory restores it and writes the report; the table
in docs/results.md must be that report's table, its list of where each variant overtakes dense, its
table of paired comparisons and its table of Lory's domain specialization, line for line, so the two
cannot drift apart.
"""

from __future__ import annotations

from tests.e2e.test_train import REPO, cli

SWEEP = REPO / "configs" / "sweeps" / "crossover.yaml"


PAIRS = "### Paired comparisons"
DOMAINS = "### Lory: routing weight by domain"


def first_table(markdown: str, after: str = "") -> list[str]:
    """The lines of the first markdown table in a text (after the first line starting with `after`)."""
    lines = markdown.splitlines()
    begin = next(i for i, line in enumerate(lines) if line.startswith(after))
    start = next(i for i in range(begin, len(lines)) if lines[i].startswith("| "))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


OVERTAKES = "Where each variant overtakes dense"


def overtakes_list(markdown: str) -> list[str]:
    """The report's verdict lines: the bullets after its 'where each variant overtakes dense' line."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(OVERTAKES)) + 1
    while not lines[start].strip():
        start += 1
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("- ")), len(lines))
    return lines[start:end]


def test_the_crossover_table_in_results_md_regenerates_from_the_record(tmp_path):
    res = cli("sweep", str(SWEEP), "--collect", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "restored" in res.stdout, res.stdout
    report = (tmp_path / "runs" / "sweeps" / "crossover" / "report_crossover.md").read_text()
    docs = (REPO / "docs" / "results.md").read_text()
    sections = {
        "crossover table": first_table(report),
        "crossover verdicts": overtakes_list(report),
        "paired comparisons": first_table(report, PAIRS),
        "domain specialization": first_table(report, DOMAINS),
    }
    assert len(sections["crossover table"]) > 2 and sections["crossover verdicts"], sections
    assert len(sections["paired comparisons"]) > 2, sections
    for name, lines in sections.items():
        want = "\n".join(lines)
        assert want in docs, f"docs/results.md's {name} differ from the record's:\n" + want
