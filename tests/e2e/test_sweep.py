"""`megamoe sweep`: expansion, local runs that skip finished and resume interrupted runs, SLURM script, collect."""

from __future__ import annotations

import csv
import json
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from megamoe.errors import ConfigError
from megamoe.sweep.attempts import read_attempts
from megamoe.sweep.runner import status
from megamoe.sweep.spec import load_sweep
from tests.e2e.test_train import cli
from tests.util import TINY

REPO = Path(__file__).resolve().parents[2]


def write_sweep(path: Path, **spec) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


def test_expansion_names_and_validation(tmp_path):
    sweep = load_sweep(write_sweep(
        tmp_path / "s.yaml", name="abl", out=str(tmp_path / "out"), config=str(REPO / "configs/debug/cpu_tiny.yaml"),
        overrides=["train.max_steps=7"],
        variants={"dense": [], "top2": {"config": str(REPO / "configs/debug/moe_top2.yaml")}},
        grid={"moe.num_experts": [4, 8]}, zip={"optim.lr": [0.001, 0.002], "optim.warmup_steps": [1, 2]},
        seeds=[5, 6],
    ))  # fmt: skip
    assert len(sweep.runs) == 2 * 2 * 2 * 2
    first = sweep.runs[0]
    assert first.name == "dense-num_experts=4-lr=0.001-warmup_steps=1-seed5"
    assert first.run_dir == tmp_path / "out" / "abl" / first.name
    assert first.cfg.train.max_steps == 7 and first.cfg.train.seed == 5 and first.cfg.optim.warmup_steps == 1
    assert [r.cfg.train.seed for r in sweep.runs] == [5] * 8 + [6] * 8  # seed-major: every variant's first seed first
    top2 = [r for r in sweep.runs if r.variant == "top2"][-1]
    assert top2.cfg.moe.top_k == 2 and top2.cfg.moe.num_experts == 8 and top2.cfg.optim.lr == 0.002
    assert status(first) == "new"


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"grid": {"moe.top_k": 2}}, r"grid: must map config keys to non-empty lists"),
        ({"zip": {"optim.lr": [1, 2], "train.seed": [1]}}, r"zip: every list must have the same length"),
        ({"sweeps": 1}, r"sweeps: unknown sweep key"),
        ({"overrides": ["model.d_modle=3"]}, r"bad.yaml: base: model.d_modle.*did you mean 'model.d_model'"),
        ({"variants": {"a": "x"}}, r"variants.a: must be a list"),
        ({"reports": ["crossover", "nope"]}, r"reports: expected a report name from \['analyze', 'balance'"),
        ({"reports": "balance"}, r"reports: expected a list of report names"),
        ({"reports": [{"crossover": {"base": "dense"}}]}, r"reports: crossover: unknown option 'base'; .*'baseline'"),
        (
            {"reports": [{"crossover": {"baseline": "dense"}}]},
            r"crossover.baseline: 'dense' is not a variant .*\['base'\]",
        ),
        ({"reports": [{"crossover": {"pairs": [["base", "top3"]]}}]}, r"crossover.pairs: 'top3' is not a variant"),
        ({"reports": [{"crossover": {"pairs": ["base"]}}]}, r"crossover.pairs: expected a list of \[a, b\] pairs"),
        ({"reports": [{"reeval": {"pairs": [["base"]]}}]}, r"reeval.pairs: expected a list of \[a, b\] pairs"),
        ({"reports": [{"crossover": {"analyze": "base"}}]}, r"crossover.analyze: expected a list of variant names"),
        ({"reports": [{"crossover": {"analyze": ["lory"]}}]}, r"crossover.analyze: 'lory' is not a variant"),
    ],
)
def test_bad_sweep_files(tmp_path, spec, match):
    with pytest.raises(ConfigError, match=match):
        load_sweep(write_sweep(tmp_path / "bad.yaml", **spec))


def test_local_sweep_skips_resumes_and_collects(data_cache, tiny_data, tmp_path):
    base = [
        *TINY,
        f"data.cache_dir={data_cache}",
        "train.checkpoint_interval=2",
        "train.eval_interval=2",
        "optim.warmup_steps=1",
    ]
    spec = {"name": "s", "out": str(tmp_path), "overrides": [*base, "train.max_steps=2"],
            "variants": {"dense": []}, "seeds": [1, 2]}  # fmt: skip
    path = write_sweep(tmp_path / "s.yaml", **spec)
    res = cli("sweep", str(path), cwd=tmp_path)
    assert res.returncode == 0, res.stderr + res.stdout
    assert "2 runs, 0 done, 2 to run" in res.stdout
    spec["overrides"][-1] = "train.max_steps=4"  # the same runs, now longer: each resumes from step 2
    write_sweep(path, **spec)
    assert {status(r) for r in load_sweep(path).runs} == {"resume"}
    res = cli("sweep", str(path), "--parallel", "2", cwd=tmp_path)
    assert res.returncode == 0, res.stderr + res.stdout
    assert res.stdout.count("(resume)") == 2
    assert "2 runs, 2 done, 0 to run" in cli("sweep", str(path), cwd=tmp_path).stdout
    res = cli("sweep", str(path), "--collect", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    with open(tmp_path / "s" / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["run"] for r in rows) == ["dense-seed1", "dense-seed2"]
    assert all(int(r["step"]) == 4 for r in rows)
    for row in rows:  # two attempts each, one of them beside the other run (--parallel 2): each its own CPU time
        found = read_attempts(tmp_path / "s" / "logs" / f"{row['run']}.attempts.jsonl")
        assert [(a["state"], a["exit"]) for a in found] == [("new", 0), ("resume", 0)]
        assert float(row["cpu_s"]) == pytest.approx(sum(a["cpu_s"] for a in found)) and float(row["cpu_s"]) > 0
    table = (tmp_path / "s" / "results.md").read_text()
    assert "| dense | 2 |" in table and " ± " in table
    assert (tmp_path / "s" / "curves.png").stat().st_size > 0
    collect_beside_runs_in_progress(path, spec, tmp_path)


def collect_beside_runs_in_progress(path, spec, tmp_path):
    """--collect while runs are unfinished: seed 3 has logged train steps but no evaluation yet, seed 4 has
    just made its log, and seed 5 stopped at step 2 of 4 (a SIGTERM stop writes its summary.json early)."""
    write_sweep(path, **{**spec, "seeds": [1, 2, 3, 4, 5]})
    seed1 = tmp_path / "s" / "dense-seed1"
    logged = (seed1 / "metrics.jsonl").read_text().splitlines()
    stopped = [line for line in logged if json.loads(line)["step"] <= 2]
    assert any("eval/loss" in line for line in stopped)
    partial = [line for line in logged if "train/loss" in line and "eval/loss" not in line]
    for seed, lines in ((3, partial), (4, []), (5, stopped)):
        assert seed == 4 or lines
        (tmp_path / "s" / f"dense-seed{seed}").mkdir()
        (tmp_path / "s" / f"dense-seed{seed}" / "metrics.jsonl").write_text("".join(f"{line}\n" for line in lines))
    summary = json.loads((seed1 / "summary.json").read_text())
    (tmp_path / "s" / "dense-seed5" / "summary.json").write_text(json.dumps({**summary, "step": 2}))
    res = cli("sweep", str(path), "--collect", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "3 of 5 runs not finished" in (tmp_path / "s" / "results.md").read_text()
    with open(tmp_path / "s" / "results.csv") as fh:
        assert sorted(r["run"] for r in csv.DictReader(fh)) == ["dense-seed1", "dense-seed2"]


def test_slurm_dry_run_prints_a_valid_array_job(tmp_path):
    spec = {"name": "arr", "out": str(tmp_path), "overrides": ["train.max_steps=3"], "seeds": [1, 2, 3],
            "grid": {"moe.num_experts": [4, 8]}, "variants": {"v": ["moe.routing=topk"]}}  # fmt: skip
    path = write_sweep(tmp_path / "s.yaml", **spec)
    res = cli("sweep", str(path), "--slurm", "--dry-run", "--parallel", "4", "--gpus", "2", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    script = res.stdout.split("# " + str(tmp_path / "arr" / "jobs.json"))[0]
    assert "#SBATCH --array=0-5%4" in script and "#SBATCH --gpus-per-node=2" in script and "@@" not in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    lines = [line[4:] for line in res.stdout.splitlines() if line.startswith("#   ")]
    assert len(lines) == 6 and f"train.run_dir={tmp_path}/arr/v-num_experts=8-seed3" in shlex.split(lines[-1])
