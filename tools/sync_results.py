"""Copy a sweep report's tables and lists into a markdown page, between the page's report markers.

A page marks each block it takes from a report with a pair of comments around it:

    <!-- report: ### Paired comparisons -->

    | a − b | steps | ... |

    <!-- /report -->

The text after `report:` is the start of a line in the report; the block is the first table or
bullet list after that line. `python tools/sync_results.py REPORT PAGE` rewrites every marked block
from REPORT; with `--check` it changes nothing and exits 1 naming the blocks that differ.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from megamoe.utils.fs import atomic_write_text

BEGIN = re.compile(r"^<!-- report: (?P<anchor>.+?) -->$")
END = "<!-- /report -->"


def report_block(report: str, anchor: str) -> list[str]:
    """The first table or bullet list after the report's first line that starts with `anchor`."""
    lines = report.splitlines()
    at = next((i for i, line in enumerate(lines) if line.startswith(anchor)), None)
    if at is None:
        raise ValueError(f"the report has no line starting with {anchor!r}")
    start = next((i for i in range(at + 1, len(lines)) if lines[i].startswith(("| ", "- "))), None)
    if start is None:
        raise ValueError(f"the report has no table or list after {anchor!r}")
    prefix = "|" if lines[start].startswith("|") else "- "
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith(prefix)), len(lines))
    return lines[start:end]


def marked_blocks(page: str, name: str = "page") -> list[tuple[str, int, int]]:
    """(anchor, first line, end line) of every marked block in a page; the lines lie between markers."""
    lines, blocks, open_at = page.splitlines(), [], None
    for i, line in enumerate(lines):
        match = BEGIN.match(line)
        if match and open_at is not None:
            raise ValueError(f"{name}:{i + 1}: a report marker opens before line {open_at[1]}'s is closed")
        if match:
            open_at = (match["anchor"], i + 1)
        elif line == END:
            if open_at is None:
                raise ValueError(f"{name}:{i + 1}: {END} without an opening '<!-- report: ... -->'")
            blocks.append((open_at[0], open_at[1], i))
            open_at = None
    if open_at is not None:
        raise ValueError(f"{name}:{open_at[1]}: the report marker is never closed with {END}")
    return blocks


def sync(report: str, page: str, name: str = "page") -> tuple[str, list[str]]:
    """The page with every marked block taken from the report, and the anchors whose block changed."""
    lines, changed, blocks = page.splitlines(), [], marked_blocks(page, name)
    if not blocks:
        raise ValueError(f"{name} has no '<!-- report: ... -->' markers")
    for anchor, first, end in reversed(blocks):
        block = ["", *report_block(report, anchor), ""]
        if lines[first:end] != block:
            changed.append(anchor)
        lines[first:end] = block
    return "\n".join(lines) + "\n", changed[::-1]


def main(argv: list[str] | None = None) -> int:
    """Rewrite (or with --check, compare) the page's marked blocks from the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="the sweep's report, e.g. runs/sweeps/crossover/report_crossover.md")
    parser.add_argument("page", type=Path, help="the markdown page with report markers, e.g. docs/results.md")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block differs")
    args = parser.parse_args(argv)
    try:
        text, changed = sync(args.report.read_text(), args.page.read_text(), str(args.page))
    except (OSError, ValueError) as err:
        print(f"sync_results: {err}", file=sys.stderr)
        return 2
    if args.check:
        for anchor in changed:
            print(f"{args.page}: the block after {anchor!r} differs from {args.report}")
        return 1 if changed else 0
    atomic_write_text(args.page, text)  # a kill mid-write leaves the old page, never half of it
    print(f"{args.page}: {len(changed)} block(s) rewritten" + (f" ({', '.join(changed)})" if changed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
