"""tools/sync_results.py: a page's marked blocks are rewritten from a report, and bad markers are named."""

from __future__ import annotations

import pytest

from tools.sync_results import main, marked_blocks, report_block, sync

REPORT = """## Budget crossover

| a | b |
|---|---|
| 1 | 2 |

Where each variant overtakes dense (ahead):

- **x**: ahead
- **y**: not ahead

### Paired comparisons

Some prose first.

| a − b | mean |
|---|---|
| x − y | +0.1 |
"""

PAGE = """# Results

Prose before.

<!-- report: ## Budget crossover -->

| a | b |
|---|---|
| 1 | 9 |

<!-- /report -->

Text between.

<!-- report: Where each variant -->
<!-- /report -->

More prose.
"""


def test_report_block_takes_the_first_table_or_list_after_the_anchor():
    assert report_block(REPORT, "## Budget") == ["| a | b |", "|---|---|", "| 1 | 2 |"]
    assert report_block(REPORT, "Where each") == ["- **x**: ahead", "- **y**: not ahead"]
    assert report_block(REPORT, "### Paired") == ["| a − b | mean |", "|---|---|", "| x − y | +0.1 |"]


def test_sync_rewrites_only_the_marked_blocks_and_names_the_changed_ones():
    text, changed = sync(REPORT, PAGE)
    assert changed == ["## Budget crossover", "Where each variant"]
    assert "| 1 | 2 |" in text and "| 1 | 9 |" not in text
    assert "<!-- report: Where each variant -->\n\n- **x**: ahead\n- **y**: not ahead\n\n<!-- /report -->" in text
    assert text.startswith("# Results\n\nProse before.\n") and text.endswith("More prose.\n")
    assert sync(REPORT, text) == (text, [])


@pytest.mark.parametrize(
    "page, message",
    [
        ("<!-- report: ## Budget crossover -->\n| x |\n", "never closed"),
        ("| x |\n<!-- /report -->\n", "without an opening"),
        ("<!-- report: ## Budget -->\n<!-- report: ### Paired -->\n<!-- /report -->\n", "opens before"),
        ("<!-- report: ## Nowhere -->\n<!-- /report -->\n", "no line starting with '## Nowhere'"),
        ("<!-- report: ### Paired comparisons\n", "no '<!-- report: ... -->' markers"),
    ],
)
def test_bad_markers_and_anchors_are_named(page, message):
    with pytest.raises(ValueError, match=message):
        sync(REPORT, page)


def test_an_anchor_without_a_table_after_it_is_named():
    with pytest.raises(ValueError, match="no table or list after"):
        report_block("## Heading\n\nonly prose\n", "## Heading")


def test_the_command_checks_then_writes(tmp_path, capsys):
    report, page = tmp_path / "report.md", tmp_path / "page.md"
    report.write_text(REPORT)
    page.write_text(PAGE)
    assert main([str(report), str(page), "--check"]) == 1
    assert page.read_text() == PAGE and "'## Budget crossover' differs" in capsys.readouterr().out
    assert main([str(report), str(page)]) == 0
    assert main([str(report), str(page), "--check"]) == 0
    assert [anchor for anchor, _, _ in marked_blocks(page.read_text())] == ["## Budget crossover", "Where each variant"]
    assert main([str(tmp_path / "missing.md"), str(page)]) == 2
