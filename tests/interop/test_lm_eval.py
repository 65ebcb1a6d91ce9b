"""lm-evaluation-harness on megamoe: the real `simple_evaluate` on the local next_line task agrees with
log-likelihoods computed directly by a plain megamoe forward; rolling log-likelihoods, generation,
batching by routing family, the CLI and its one-line errors.

Tolerance (TOL_PER_TOKEN): lm-eval scores requests in right-padded batches of up to 8 rows, the
direct computation one row at a time, so the same fp32 sums run in another order (other matmul
blockings, another attention kernel). Reordering an fp32 sum of K terms of magnitude m moves it by
about √K·u·m (rounding errors of random sign; u = 2^-24 ≈ 6e-8), K·u·m at the very worst. Here
K ≤ 128 (d_model 32, FFN width ≤ 128), the logits are O(10), and about 8 such reductions are chained
(2 blocks × attention and FFN, the head, log-softmax) and add in quadrature: per token
3σ · √8 · √128 · 6e-8 · 10 ≈ 6e-5. (The worst case, 8 · 128 · 6e-8 · 10 ≈ 6e-4, is 100× the
measured differences and would let a planted off-by-one pass on some items.) An item's
log-likelihood sums C continuation tokens: tolerance C · TOL_PER_TOKEN.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance

from megamoe.cli.main import main
from megamoe.config import ModelConfig, load_config
from megamoe.data.tokenizer import eod_id, load_tokenizer
from megamoe.interop import lm_eval_run
from megamoe.interop.lm_eval_model import MegamoeLM, batch_mode, plan_batches
from megamoe.model import build_model
from megamoe.train.export import load_run_model
from tests.util import single_process_trainer, tiny_config

REPO = Path(__file__).resolve().parents[2]
TOL_PER_TOKEN = 6e-5
MOE = ["moe.routing=topk", "moe.num_experts=4", "moe.top_k=2"]
"""Dropless top-2 token choice: rows share right-padded batches ('pad' mode)."""


@pytest.fixture(scope="module")
def run(data_cache, tiny_data, tmp_path_factory) -> Path:
    """A tiny top-2 MoE run: 12 steps on the embedded corpus (about 8 s)."""
    run_dir = tmp_path_factory.mktemp("lm_eval") / "run"
    over = [*MOE, "train.max_steps=12", "train.eval_interval=12", "train.checkpoint_interval=12"]
    single_process_trainer(tiny_config(data_cache, run_dir, *over)).fit()
    return run_dir


@pytest.fixture(scope="module")
def evaluated(run) -> dict:
    """lm-eval's record of next_line on the run: all 150 items, batches of 8."""
    options = {"num_fewshot": None, "limit": None, "batch_size": 8, "include_paths": []}
    return lm_eval_run.evaluate(run, ["next_line"], options)


def model_and_tokenizer(run: Path):
    """The run's model (eval mode) and tokenizer."""
    return load_run_model(run)[0], load_tokenizer(run / "tokenizer.json")


def row_of(model, ids: list[int]) -> torch.Tensor:
    """One row of token ids on the model's device (MegamoeLM moves a model to the GPU when there is one)."""
    return torch.tensor([ids], device=next(model.parameters()).device)


@torch.inference_mode()
def direct_loglikelihood(model, tok, context: str, continuation: str, shift: int = 0) -> float:
    """Σ log p(continuation tokens) from one plain forward: whole text encoded, split at the context's count."""
    whole = tok.encode(context + continuation).ids
    n_cont = len(whole) - len(tok.encode(context).ids)
    window = whole[-(model.cfg.seq_len + 1) :]
    logp_LV = torch.log_softmax(model(row_of(model, window[:-1])).logits_BLV[0].float(), -1)
    targets_L = torch.tensor(window[1:], device=logp_LV.device)
    token_logp_L = logp_LV.gather(-1, targets_L[:, None])[:, 0]
    return float(token_logp_L[len(token_logp_L) - n_cont - shift : len(token_logp_L) - shift].sum())


def items(run: Path) -> list[dict]:
    """The built test items of next_line."""
    path = run / "eval" / "tasks" / "next_line" / "test.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def direct_table(model, tok, rows: list[dict], shift: int = 0) -> list[list[float]]:
    """Direct log-likelihood of every choice of every item (lm-eval's continuation: "\\n" + choice)."""
    return [[direct_loglikelihood(model, tok, r["context"], "\n" + c, shift) for c in r["choices"]] for r in rows]


def accuracies(lls: list[list[float]], rows: list[dict]) -> tuple[float, float]:
    """acc and acc_norm as lm-eval defines them; np.argmax breaks ties towards the lowest choice index."""
    acc = np.mean([np.argmax(ll) == r["label"] for ll, r in zip(lls, rows)])
    lengths = [np.array([len(c) for c in r["choices"]], dtype=float) for r in rows]
    acc_norm = np.mean([np.argmax(np.array(ll) / n) == r["label"] for ll, n, r in zip(lls, lengths, rows)])
    return float(acc), float(acc_norm)


def test_accuracy_equals_direct_loglikelihoods(run, evaluated):
    """lm-eval's acc/acc_norm == those of the direct log-likelihoods; each item's lls within C · TOL."""
    rows = items(run)
    model, tok = model_and_tokenizer(run)
    direct = direct_table(model, tok, rows)
    logged = sorted(evaluated["samples"]["next_line"], key=lambda s: s["doc_id"])
    assert len(logged) == len(rows) == 150
    worst = 0.0
    for sample, row, ll in zip(logged, rows, direct):
        assert sample["target"] == row["label"]
        for (got, _), want, n in zip(sample["resps"], ll, continuation_tokens(tok, row)):
            assert abs(got - want) <= n * TOL_PER_TOKEN, (sample["doc_id"], got, want)
            worst = max(worst, abs(got - want))
    acc, acc_norm = accuracies(direct, rows)
    margin = min(np.diff(np.sort(ll))[-1] for ll in direct)
    assert evaluated["tasks"]["next_line"]["acc"] == acc
    assert evaluated["tasks"]["next_line"]["acc_norm"] == acc_norm
    print(f"next_line acc {acc:.4f} acc_norm {acc_norm:.4f}; max |Δ ll| {worst:.2e}; min top-2 margin {margin:.2e}")


def test_next_line_items_come_from_held_out_documents(run, evaluated):
    """Every item is a validation document's lines and true next line; a rebuild writes the same bytes."""
    from megamoe.data import prepare_data
    from megamoe.data.corpus import load_documents
    from megamoe.interop import next_line
    from megamoe.train.run import load_run_config

    cfg = load_run_config(str(run), [])
    data = prepare_data(cfg.data, progress=False)
    val, train = set(data.split("val").doc_ids.tolist()), set(data.split("train").doc_ids.tolist())
    docs = load_documents(cfg.data, Path(cfg.data.cache_dir) / "hf")
    folder = run / "eval" / "tasks" / "next_line"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    rows = items(run) + [json.loads(x) for x in (folder / "fewshot.jsonl").read_text().splitlines()]
    for row in rows:
        assert row["doc"] in val and row["doc"] not in train
        lines = [x.rstrip() for x in docs[row["doc"]]["text"].splitlines()]
        assert row["context"] == "\n".join(lines[row["line"] - 4 : row["line"]])
        assert row["choices"][row["label"]] == lines[row["line"]] and len(set(row["choices"])) == 4
    assert len({(r["doc"], r["line"]) for r in rows}) == len(rows) == 160
    next_line.build(run, load_tokenizer(run / "tokenizer.json"))
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def continuation_tokens(tok, row: dict) -> list[int]:
    """Continuation token count of each choice (the whole text's tokens minus the context's)."""
    context = len(tok.encode(row["context"]).ids)
    return [len(tok.encode(row["context"] + "\n" + c).ids) - context for c in row["choices"]]


def test_a_planted_off_by_one_is_caught(run, evaluated):
    """The direct computation with its continuation slice shifted by one token fails the comparison on most items."""
    rows = items(run)[:40]
    model, tok = model_and_tokenizer(run)
    shifted = direct_table(model, tok, rows, shift=1)
    logged = sorted(evaluated["samples"]["next_line"], key=lambda s: s["doc_id"])[:40]
    off = [
        abs(got - want) > n * TOL_PER_TOKEN
        for s, row, ll in zip(logged, rows, shifted)
        for (got, _), want, n in zip(s["resps"], ll, continuation_tokens(tok, row))
    ]
    assert np.mean(off) > 0.9


def rolling_direct(model, ids: list[int], eod: int) -> float:
    """Σ log p of each token after an EOD prefix: disjoint blocks of seq_len predictions, each with a full window."""
    seq = [eod, *ids]
    length, total = model.cfg.seq_len, 0.0
    for first in range(0, len(ids), length):
        last = min(first + length, len(ids))
        start = max(0, last - length)
        logp_LV = torch.log_softmax(model(row_of(model, seq[start:last])).logits_BLV[0].float(), -1)
        targets_L = torch.tensor(seq[start + 1 : last + 1], device=logp_LV.device)
        total += float(logp_LV.gather(-1, targets_L[:, None])[first - start :].sum())
    return total


@torch.inference_mode()
def test_loglikelihood_rolling_equals_direct(run):
    """Whole-document log-likelihoods: one window (short text) and several (about 3.5 windows)."""
    model, tok = model_and_tokenizer(run)
    text = "\n".join(r["context"] for r in items(run)[:12])
    short = tok.decode(tok.encode(text).ids[:20])
    long = tok.decode(tok.encode(text).ids[:115])
    requests = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate((short, long))]
    for batch_size in (1, 4):
        got = MegamoeLM(model, tok, batch_size=batch_size).loglikelihood_rolling(requests, disable_tqdm=True)
        for value, t in zip(got, (short, long)):
            ids = tok.encode(t).ids
            assert value == pytest.approx(rolling_direct(model, ids, eod_id(tok, "t")), abs=len(ids) * TOL_PER_TOKEN)


def test_generate_until_stops_at_the_stop_string(run):
    """Greedy text == megamoe's greedy generation decoded and cut before the first stop string."""
    from megamoe.model.generate import generate

    lm = MegamoeLM.from_run(run)
    model, tok, context = lm.model, lm.tok, items(run)[0]["context"]
    free = lm.generate_until([Instance("generate_until", {}, (context, {"max_gen_toks": 12}), 0)], True)[0]
    prompt = tok.encode(context).ids[-(model.cfg.seq_len - 12) :]
    ids = generate(model, row_of(model, prompt), 12, stop_id=eod_id(tok, "t"))[0].tolist()
    assert free == tok.decode(ids[: ids.index(lm.eot_token_id)] if lm.eot_token_id in ids else ids)
    stop = free[len(free) // 2 :][:2] or "\n"
    cut = lm.generate_until([Instance("generate_until", {}, (context, {"max_gen_toks": 12, "until": [stop]}), 0)])
    assert cut[0] == free.split(stop)[0] and (stop not in free or len(cut[0]) < len(free))


def tiny_model(*overrides: str):
    """A random 2-layer model with a 512-token vocabulary and 32-token context."""
    cfg = ModelConfig(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, seq_len=32, vocab_size=512)
    return build_model(cfg, 0, moe=load_config(None, list(overrides)).moe).eval()


@torch.inference_mode()
def test_batching_follows_the_routing_family(run):
    """Right padding would change Lory's first segment: Lory batches equal lengths only; batched == row by row."""
    lory = tiny_model("moe.routing=lory", "moe.num_experts=4", "moe.segment_length=8", "moe.moe_every=1")
    tokens_L = torch.randint(0, 512, (5,), generator=torch.Generator().manual_seed(0))
    padded_L = torch.cat([tokens_L, torch.zeros(7, dtype=torch.long)])  # 5 real tokens in a first segment of 8
    alone, padded = lory(tokens_L[None]).logits_BLV[0], lory(padded_L[None]).logits_BLV[0, :5]
    assert not torch.allclose(alone, padded, atol=1e-4)
    capped = tiny_model(*MOE, "moe.eval_capacity_factor=1.0")
    assert [batch_mode(m) for m in (lory, capped, tiny_model(), tiny_model(*MOE))] == ["equal", "single", "pad", "pad"]
    assert list(plan_batches([3, 5, 5, 3, 4], 2, "equal")) == [[1, 2], [4], [0, 3]]
    assert list(plan_batches([3, 5, 5], 2, "single")) == [[1], [2], [0]]
    tok = load_tokenizer(run / "tokenizer.json")
    rows = items(run)[:6]
    reqs = [Instance("loglikelihood", {}, (r["context"], "\n" + c), 0) for r in rows for c in r["choices"]]
    for model in (lory, capped):
        one, many = (MegamoeLM(model, tok, batch_size=b).loglikelihood(reqs, True) for b in (1, 8))
        assert [g for _, g in one] == [g for _, g in many]
        assert np.allclose([s for s, _ in one], [s for s, _ in many], rtol=0, atol=32 * TOL_PER_TOKEN)


def test_cli_eval_tasks_writes_reports(run, evaluated):
    """`megamoe eval RUN --tasks next_line --limit 20`: the table on stdout, the JSON, .md and samples in eval/."""
    argv = ["eval", str(run), "--tasks", "next_line", "--limit", "20", "--batch-size", "4"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-m", "megamoe", *argv], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "| next_line | acc |" in res.stdout
    rec = json.loads((run / "eval" / "lm_eval_step_12.json").read_text())
    assert rec["tasks"]["next_line"]["samples"] == 20 == rec["tasks"]["next_line"]["limit"] and rec["step"] == 12
    assert (run / "eval" / "lm_eval_step_12.md").read_text().startswith("lm-eval at step 12")
    samples = (run / "eval" / "lm_eval_step_12_samples.jsonl").read_text().splitlines()
    assert len(samples) == 20
    first20 = sorted(evaluated["samples"]["next_line"], key=lambda s: s["doc_id"])[:20]
    got = sorted((json.loads(s) for s in samples), key=lambda s: s["doc_id"])
    assert [s["acc"] for s in got] == [s["acc"] for s in first20]


def test_sweep_collect_includes_lm_eval_columns(run, evaluated, tmp_path):
    """--collect: runs with an lm-eval record at their final step get lm_eval/<task>/<metric> columns, others none."""
    import csv
    import shutil

    from megamoe.sweep.collect import collect
    from megamoe.sweep.spec import Run, Sweep
    from megamoe.train.run import load_run_config

    lm_eval_run.write(run, dict(evaluated))
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("summary.json", "metrics.jsonl"):
        shutil.copy(run / name, plain / name)
    cfg = load_run_config(str(run), [])
    runs = (Run("v-seed1", "v", None, (), 1, run, cfg), Run("v-seed2", "v", None, (), 2, plain, cfg))
    root, table = collect(Sweep("s", tmp_path / "s.yaml", tmp_path / "s", runs))
    with open(root / "results.csv") as fh:
        rows = {r["run"]: r for r in csv.DictReader(fh)}
    acc = evaluated["tasks"]["next_line"]["acc"]
    assert float(rows["v-seed1"]["lm_eval/next_line/acc"]) == acc and rows["v-seed2"]["lm_eval/next_line/acc"] == ""
    assert "next_line/acc" in table and f"{acc:.3f}" in table


def error_line(capsys, *argv: str) -> str:
    """Run the CLI in this process; it must fail with exit status 2 and one stderr line, returned."""
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    return err


def test_without_lm_eval_one_line_says_how_to_install(run, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what `import lm_eval` meets when it is not installed
    err = error_line(capsys, "eval", str(run), "--tasks", "next_line")
    assert err == "megamoe: error: --tasks needs lm-evaluation-harness: pip install megamoe[eval]"


def test_bad_task_and_flags_are_one_line_errors(run, capsys, tmp_path):
    tasks = run / "eval" / "tasks"
    err = error_line(capsys, "eval", str(run), "--tasks", "next_line,no_such_task", "--limit", "1")
    assert err == (f"megamoe: error: --tasks: unknown task 'no_such_task' (searched {tasks} "
                   "and lm-eval's built-in tasks)")  # fmt: skip
    err = error_line(capsys, "eval", str(run), "--tasks", "next_line", "--limit", "0")
    assert err.endswith("--limit must be >= 1, got 0")
    missing = tmp_path / "nope"
    err = error_line(capsys, "eval", str(run), "--tasks", "x", "--include-path", str(missing))
    assert err.endswith(f"--include-path: {missing} is not a folder")
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "hub_only.yaml").write_text(
        "task: hub_only\ndataset_path: nobody/not_cached\noutput_type: multiple_choice\ntest_split: test\n"
        "doc_to_text: q\ndoc_to_choice: choices\ndoc_to_target: label\n"
    )
    err = error_line(capsys, "eval", str(run), "--tasks", "hub_only", "--include-path", str(folder))
    assert err.startswith("megamoe: error: --tasks: task 'hub_only' does not load offline (")
    assert error_line(capsys, "eval", str(run), "--tasks", "a,,b").endswith("--tasks: 'a,,b' has an empty task name")
    assert error_line(capsys, "eval", str(run), "--num-fewshot", "2").endswith("--num-fewshot needs --tasks")
