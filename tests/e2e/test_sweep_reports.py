"""Study reports end to end: a tiny budget sweep of dense, top-2 and Lory, collected with its reports."""

from __future__ import annotations

import json
import re
import shutil
import statistics

import pytest
import yaml

from megamoe.train.export import load_run_model
from megamoe.train.metrics import read_metrics
from tests.e2e.test_sweep_budgets import overrides
from tests.e2e.test_train import cli

TOP2 = ["moe.routing=topk", "moe.num_experts=4", "moe.top_k=2", "moe.capacity_factor=0", "moe.eval_capacity_factor=0"]
LORY = ["moe.routing=lory", "moe.num_experts=4", "moe.segment_length=8", "moe.dense_warmup_fraction=0"]
REPORTS = [
    "balance",
    {"crossover": {"baseline": "dense", "pairs": [["lory", "top2"]], "analyze": ["lory"]}},
    {"reeval": {"max_sequences": 4, "pairs": [["lory", "dense"]]}},
    {
        "analyze": {
            "runs": [
                {"variant": "top2", "args": ["--min-count", "4", "--max-sequences", "8"]},
                {
                    "variant": "top2",
                    "args": ["--eval-capacity-factor", "0.5", "--max-sequences", "8"],
                    "out": "analysis_cf",
                },
            ]
        }
    },
]


@pytest.fixture(scope="module")
def collected(data_cache, tiny_data, tmp_path_factory):
    """The sweep [6, 10] steps × {dense, top2, lory} × seeds {1, 2}, trained and collected."""
    root = tmp_path_factory.mktemp("reports")
    spec = {"name": "x", "out": str(root), "overrides": overrides(data_cache), "budgets": [6, 10], "seeds": [1, 2],
            "variants": {"dense": [], "top2": TOP2, "lory": LORY}, "reports": REPORTS,
            "archive": "archive"}  # fmt: skip
    return sweep_and_collect(root, spec)


def sweep_and_collect(root, spec: dict):
    """Write spec as <root>/<name>.yaml, run `megamoe sweep --parallel 2` on it and then `--collect`; its output folder.

    Two 1-thread runs side by side, as docs/sweeps.md advises on 2 cores: these tiny runs are mostly Python."""
    path = root / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    for args in (("--parallel", "2"), ("--collect",)):
        res = cli("sweep", str(path), *args, cwd=root)
        assert res.returncode == 0, res.stderr + res.stdout
    return root / spec["name"]


def final_loss(run_dir) -> float:
    """The run's final validation loss, from its own metrics."""
    return [r for r in read_metrics(run_dir) if "eval/loss" in r][-1]["eval/loss"]


def row(report: str, steps: int, variant: str) -> list[str]:
    """The cells of the crossover table's row for (steps, variant)."""
    (line,) = [x for x in report.splitlines() if re.match(rf"\| {steps} \| [\d,]+ \| {variant} \|", x)]
    return [c.strip() for c in line.strip("|").split("|")]


def test_results_md_has_both_reports(collected):
    page = (collected / "results.md").read_text()
    assert "## Load balance over training" in page and "## Budget crossover" in page and "## Re-evaluation" in page
    assert (collected / "crossover.png").stat().st_size > 0 and (collected / "balance_load_cv.png").stat().st_size > 0
    sections = [(collected / f"report_{name}.md").read_text() for name in ("balance", "crossover", "reeval", "analyze")]
    assert page.endswith("\n" + "\n".join(sections))  # in the sweep file's order


def test_crossover_difference_is_the_runs_own_losses(collected):
    report = (collected / "report_crossover.md").read_text()
    for steps in (6, 10):
        moe = [final_loss(collected / f"lory-seed{s}-steps{steps}") for s in (1, 2)]
        dense = [final_loss(collected / f"dense-seed{s}-steps{steps}") for s in (1, 2)]
        cells = row(report, steps, "lory")
        assert cells[3] == "2"
        assert cells[5] == f"{statistics.fmean(moe):.3f} ± {statistics.stdev(moe):.3f}"
        diff, se = (float(x) for x in cells[7].split(" ± "))
        assert diff == pytest.approx(statistics.fmean(moe) - statistics.fmean(dense), abs=1e-3)
        assert se == pytest.approx((statistics.variance(moe) / 2 + statistics.variance(dense) / 2) ** 0.5, abs=1e-3)
    line = re.search(r"- \*\*top2\*\*: (ahead from|not ahead through the largest budget);.*", report)
    assert line and f"1,280 tokens {row(report, 10, 'top2')[7].split(' ± ')[0]} (" in line.group(0)


def test_dense_flops_count_every_matmul_weight(collected):
    """FLOPs = tokens · (6 · the trained model's 2-D weights other than the input embedding + 12 · L · d · s)."""
    run_dir = collected / "dense-seed1-steps10"
    model, _ = load_run_model(run_dir)
    cfg = model.cfg
    weights = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and not n.startswith("embed."))
    tokens = json.loads((run_dir / "summary.json").read_text())["tokens"]
    expected = tokens * (6 * weights + 12 * cfg.num_layers * cfg.d_model * cfg.seq_len)
    # the table prints FLOPs to 3 significant digits: compare the printed text, exactly
    assert row((collected / "report_crossover.md").read_text(), 10, "dense")[4] == f"{expected:.3g}"


def test_pairs_balance_and_lory_domains(collected):
    report = (collected / "report_crossover.md").read_text()
    loss = {(v, s): final_loss(collected / f"{v}-seed{s}-steps10") for v in ("lory", "top2") for s in (1, 2)}
    diffs = [loss["lory", s] - loss["top2", s] for s in (1, 2)]
    tokens = row(report, 10, "lory")[1]
    assert f"| lory − top2 | 10 | {tokens} | 1, 2 | {diffs[0]:+.3f}, {diffs[1]:+.3f} |" in report, report
    assert "| lory | 1 | " in report and "| lory | 2 | " in report
    assert (collected / "lory-seed1-steps10" / "analysis" / "lory_domain_L1.png").is_file()
    assert "(lory-seed1-steps10/analysis/lory_domain_L" in report and "(lory-seed2-steps10/analysis" not in report
    balance = (collected / "report_balance.md").read_text()
    assert re.search(r"\| top2-steps10 \| 2 \|", balance) and "| dense" not in balance


def test_reeval_is_megamoe_eval_of_the_final_checkpoint(collected):
    """On the trainer's own 4 val sequences (2 eval batches of 2), fp32 eval reproduces the logged loss."""
    report = (collected / "report_reeval.md").read_text()
    lory = [json.loads((collected / f"lory-seed{s}-steps6" / "eval" / "step_6.json").read_text()) for s in (1, 2)]
    assert all(r["sequences"] == 4 for r in lory)
    again = [r["domains"][0]["loss"] for r in lory]
    logged = [final_loss(collected / f"lory-seed{s}-steps6") for s in (1, 2)]
    assert again == pytest.approx(logged, abs=2e-4)  # both fp32 on the same sequences; eval rounds to 4 decimals
    dense = json.loads((collected / "dense-seed2-steps6" / "eval" / "step_6.json").read_text())["domains"][0]["loss"]
    assert "- **lory-steps6 − dense-steps6**, fp32 re-evaluation, paired by seed: seed 1: " in report
    assert f"seed 2: {again[1] - dense:+.3f}." in report


def test_analyses_are_inlined_with_links_into_the_run(collected):
    page = (collected / "report_analyze.md").read_text()
    run = collected / "top2-seed1-steps10"
    assert "### top2-seed1-steps10: `megamoe analyze --min-count 4 --max-sequences 8`" in page
    assert "### Routing report: " in page and "#### Context-independent specialization" in page
    links = re.findall(r"\]\(([^)]+\.(?:png|csv))\)", page)
    assert links and all((collected / link).is_file() for link in links)
    assert any(link.startswith("top2-seed1-steps10/analysis_cf/") for link in links)
    # the trained run is dropless; the override reached the second analysis: at factor 0.5 choices are dropped
    assert "No token was dropped at evaluation" in (run / "analysis" / "report.md").read_text()
    assert (run / "analysis_cf" / "drops_by_position.csv").is_file()


def test_archive_regenerates_the_study_without_the_run_folders(collected, tmp_path):
    """The committed-archive path: a clean folder with only the sweep file and its archive collects the same tables.

    No checkpoint is archived, so every cached record a report reads (analyses, fp32 re-evaluations)
    must have been kept; a rerun of the sweep finds every run done and trains nothing."""
    archive = collected.parent / "archive"
    assert not list(archive.rglob("checkpoints")) and (archive / "logs" / "lory-seed1-steps10.attempts.jsonl").is_file()
    shutil.copytree(archive, tmp_path / "archive")
    spec = yaml.safe_load((collected.parent / "x.yaml").read_text())
    (tmp_path / "x.yaml").write_text(yaml.safe_dump({**spec, "out": str(tmp_path)}))
    listed = cli("sweep", "x.yaml", "--dry-run", cwd=tmp_path)
    assert listed.returncode == 0 and listed.stdout.count("archive ") == 12, listed.stdout + listed.stderr
    res = cli("sweep", "x.yaml", "--collect", cwd=tmp_path)
    assert res.returncode == 0, res.stderr + res.stdout
    assert "restored 12 finished runs from the archive" in res.stdout
    for name in ("results.md", "results.csv", "report_crossover.md", "report_reeval.md", "report_analyze.md"):
        assert (tmp_path / "x" / name).read_text() == (collected / name).read_text(), name
    again = cli("sweep", "x.yaml", cwd=tmp_path)
    assert again.returncode == 0 and "12 done, 0 to run" in again.stdout, again.stdout + again.stderr
