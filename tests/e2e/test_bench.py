"""The benchmark scripts run at tiny shapes on the CPU (GPU peers that cannot run here are skipped cleanly)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.util import TINY

REPO = Path(__file__).resolve().parents[2]


def bench(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TRITON_INTERPRET", None)  # the Triton merge variant must report itself skipped on a CPU
    res = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def table_rows(out: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("| ")][1:]


def test_gpu_models_tiny():
    out = bench("bench.gpu_models", "--tiny", "--variants", "dense", "lory 8E (reference merge)",
                "lory 8E (triton merge)", "top-2 8E dropless")  # fmt: skip
    rows = {r[0]: r for r in table_rows(out)}
    assert rows["dense"][4] == "1.00" and float(rows["top-2 8E dropless"][3].replace(",", "")) > 0
    assert rows["lory 8E (triton merge)"][1].startswith("skipped: ConfigError: moe.merge_impl: triton needs a CUDA")
    # equal active size: Lory merges to the dense FFN; top-2 experts are half as wide
    assert rows["dense"][1] == rows["lory 8E (reference merge)"][1] == rows["top-2 8E dropless"][1]


def test_peer_moe_layers_tiny():
    rows = table_rows(bench("bench.peer_moe_layers", "--tiny"))
    by = {(r[0], r[1]): r for r in rows}
    assert by[("dropless", "megamoe")][4] == "1.00" and by[("capacity 1.25", "megamoe")][4] == "1.00"
    assert by[("dropless", "megatron-core MoELayer")][2].startswith("skipped: RuntimeError: megatron-core's MoE router")
    assert float(by[("dropless", "DeepSpeed-MoE")][2]) > 0  # DeepSpeed-MoE runs on the CPU


def test_pipeline_bubble_smoke():
    """Every schedule runs on a 2-rank pipeline; the ideal column is (p−1)/(m+p−1), (p−1)/(v·m+p−1) interleaved."""
    rows = {r[1]: r for r in table_rows(bench("bench.pipeline_bubble", "--smoke"))}
    assert set(rows) == {"gpipe", "1f1b", "interleaved_1f1b"}
    assert rows["gpipe"][3] == rows["1f1b"][3] == "0.333" and rows["interleaved_1f1b"][3] == "0.200"
    assert all(0 <= float(r[4]) < 1 and float(r[8]) > 0 for r in rows.values())


def test_recompute_smoke():
    """Every family × mode is measured; ratios are to none, and full recompute keeps fewer saved bytes."""
    rows = {(r[0], r[1]): r for r in table_rows(bench("bench.recompute", "--smoke"))}
    families = {"smoke dense", "smoke top-2 8E", "smoke Lory 8E T64"}
    assert set(rows) == {(f, m) for f in families for m in ("none", "selective", "full")}
    for family in families:
        assert rows[(family, "none")][3] == rows[(family, "none")][7] == "1.00"
        assert float(rows[(family, "full")][3]) < 1 and float(rows[(family, "full")][4].replace(",", "")) > 0


def test_fused_loss_smoke():
    """The plain path and each chunk size are measured; the fused loss saves fewer bytes than the plain one."""
    rows = {r[1]: r for r in table_rows(bench("bench.fused_loss", "--smoke", "--chunks", "32"))}
    assert set(rows) == {"plain", "fused, 32 tokens"}
    assert rows["plain"][3] == rows["plain"][7] == "1.00"
    assert float(rows["fused, 32 tokens"][3]) < 1 and float(rows["fused, 32 tokens"][6].replace(",", "")) > 0


def test_precision_tiny():
    """Every family runs in fp32 and bf16 autocast and gets a ratio."""
    rows = table_rows(bench("bench.precision", "--steps", "1", "--rounds", "1", "--widths", "32"))
    assert [r[0] for r in rows] == ["dense", "top-2", "GRIN", "Lory"]
    assert all(float(r[4].rstrip("×")) > 0 for r in rows)


def test_lory_layer_rounds_tiny():
    """Every (threads, merge, E, T) chosen gets a row, in order, with a median ratio inside its range of rounds."""
    args = ["--tokens", "256", "--dim", "32", "--hidden", "64", "--seq-len", "128", "--repeats", "1", "--rounds", "3"]
    grid = ["--experts", "2", "4", "--segments", "16", "64", "--threads", "1", "2", "--impl", "reference", "auto"]
    out = bench("bench.lory_layer", *args, *grid)
    rows = table_rows(out)
    merges = ("reference", "cpu")  # auto resolves to the fused CPU kernel here
    keys = [[t, m, e, seg] for t in ("1", "2") for m in merges for seg in ("16", "64") for e in ("2", "4")]
    assert [r[:4] for r in rows] == keys
    for r in rows:
        low, high = (float(v) for v in r[7].split("–"))
        assert low <= float(r[6]) <= high and float(r[8]) > 0
    assert "dense SwiGLU, 1 threads:" in out and "dense SwiGLU, 2 threads:" in out and "input grad False" in out


def test_lory_layer_input_grad_tiny():
    """--input-grad measures with an input that requires grad (backward computes dx) and says so."""
    args = ["--tokens", "256", "--dim", "32", "--hidden", "64", "--seq-len", "128", "--repeats", "1", "--input-grad"]
    out = bench("bench.lory_layer", *args, "--experts", "2", "--segments", "16", "--threads", "1")
    assert "input grad True" in out and "fwd+bwd by wall time" in out
    assert [r[:4] for r in table_rows(out)] == [["1", "cpu", "2", "16"]]


def test_lory_layer_process_clock_tiny():
    """--clock process times CPU seconds over all threads, says so, and rows come out at more threads than cores."""
    args = ["--tokens", "256", "--dim", "32", "--hidden", "64", "--seq-len", "128", "--repeats", "1"]
    grid = ["--experts", "2", "--segments", "16", "--threads", "4", "--impl", "cpu"]
    out = bench("bench.lory_layer", *args, "--clock", "process", *grid)
    assert "by process CPU time (all threads" in out
    row = table_rows(out)[0]
    assert row[:4] == ["4", "cpu", "2", "16"] and float(row[6]) > 0


def test_prepare_throughput_tiny():
    """One process and sharded on 1 and 2 workers prepare the same tokens; every variant gets a rate."""
    record = json.loads(bench("bench.prepare_throughput", "--docs", "1200", "--words", "40", "--shard", "300"))
    assert record["tokens"] > 0 and record["shard_overhead"] > 0
    assert all(record[v]["tokens_per_s"] > 0 for v in ("one_process", "sharded_w1", "sharded_w2"))


def test_sweep_parallel_tiny(data_cache, tiny_data, tmp_path):
    """A tiny sweep's variant trains alone on every core, then as 2 runs side by side, and gets a rate each."""
    overrides = [*TINY, f"data.cache_dir={data_cache}", "optim.warmup_steps=1", "logging.log_interval=1"]
    sweep = tmp_path / "tiny.yaml"
    sweep.write_text(yaml.safe_dump({"name": "tiny", "overrides": overrides, "variants": {"dense": []}}))
    rows = table_rows(bench("bench.sweep_parallel", "--sweep", str(sweep), "--variants", "dense", "--steps", "3"))
    cores = os.cpu_count() or 1
    assert [r[:2] for r in rows] == [["dense", f"1 × {cores} threads"], ["dense", f"2 × {max(1, cores // 2)} threads"]]
    assert all(float(r[3]) > 0 and float(r[4].replace(",", "")) > 0 for r in rows)
