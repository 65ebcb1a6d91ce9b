"""The router-health report's arithmetic: table steps, windowed means over steps and layers, the lowest seed."""

from __future__ import annotations

import json

import yaml

from megamoe.sweep.reports.router_health import COLUMNS, report
from megamoe.sweep.spec import load_sweep
from megamoe.train.metrics import ROUTER_HEALTH_FILE
from tests.util import TINY


def sweep_of(tmp_path):
    spec = {"name": "r", "out": str(tmp_path), "overrides": [*TINY, "train.max_steps=9"], "seeds": [1, 2, 3],
            "variants": {"gru": ["moe.routing=topk", "moe.scorer=gru"], "linear": ["moe.routing=topk"]}}  # fmt: skip
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(spec))
    return load_sweep(path)


def write(run, records: list[dict]) -> None:
    run.run_dir.mkdir(parents=True)
    (run.run_dir / ROUTER_HEALTH_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))


def rows(section: str) -> list[list[str]]:
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    assert lines[0] == "| run | step | " + " | ".join(COLUMNS) + " |"
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[1:]]


def test_windows_layers_and_the_lowest_logged_seed(tmp_path):
    sweep = sweep_of(tmp_path)
    by = {run.name: run for run in sweep.runs}
    # seed 1 logged nothing: seeds 2 (shown) and 3 (not) did
    write(by["gru-seed2"], [{"step": s, "grad/router": s, "L0/top1": s, "L1/top1": s + 1} for s in range(1, 10)])
    write(by["linear-seed2"], [{"step": s, "grad/router": 10 * s} for s in range(1, 8)])  # stopped at step 7
    write(by["gru-seed3"], [{"step": 1, "grad/router": 99}])
    section = report(sweep, [], tmp_path)
    assert section.startswith("## Router health over training\n\nSeed 2 of each run")
    table = rows(section)
    col = {key: i + 2 for i, key in enumerate(COLUMNS)}
    assert [r[:2] for r in table] == [["gru-seed2", "1"], ["", "3"], ["", "9"], ["linear-seed2", "1"], ["", "3"]]
    # step 9: steps 5..9; step 3: steps 1..3; top1 also averaged over layers L0 and L1
    assert [r[col["grad/router"]] for r in table] == ["1", "2", "7", "10", "20"]
    assert [r[col["top1"]] for r in table[:3]] == ["1.5", "2.5", "7.5"]
    assert table[3][col["top1"]] == "—" and table[0][col["grad/proj"]] == "—"


def test_no_logged_run(tmp_path):
    assert "No run logged router health" in report(sweep_of(tmp_path), [], tmp_path)
