"""Training end to end: resume equivalence, preemption, checkpoint safety, the CLI."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

import megamoe.train.checkpoint as ckpt
from megamoe.errors import CheckpointError, MegamoeError
from megamoe.train.metrics import read_metrics
from megamoe.train.trainer import Trainer, emulated_bf16_warning
from megamoe.utils.host import native_bf16
from tests.distributed.parity import read_state
from tests.util import TINY, single_process_trainer, tiny_config

REPO = Path(__file__).resolve().parents[2]


def train(cache: Path, run_dir: Path, *extra: str, resume: bool = False) -> dict:
    """Run the tiny config in this process; returns the summary (with the trainer under '_trainer')."""
    trainer = single_process_trainer(tiny_config(cache, run_dir, *extra), resume)
    return {**trainer.fit(), "_trainer": trainer}


def losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, train loss) pairs logged by a run."""
    return [(r["step"], r["train/loss"]) for r in read_metrics(run_dir) if "train/loss" in r]


def test_resume_continues_exactly(data_cache, tiny_data, tmp_path):
    """6 steps straight == 3 steps, stop, resume, 3 more: identical losses and weights."""
    straight = tmp_path / "straight"
    whole = train(data_cache, straight)
    split = tmp_path / "split"
    train(data_cache, split, "train.max_steps=3")
    resumed = train(data_cache, split, resume=True)
    assert resumed["step"] == 6
    assert losses(split) == losses(straight)
    assert [s for s, _ in losses(split)] == [1, 2, 3, 4, 5, 6]
    evals = [[r["eval/loss"] for r in read_metrics(run) if "eval/loss" in r] for run in (split, straight)]
    assert evals[0] == evals[1] and len(evals[0]) == 2
    final = whole["_trainer"].model.state_dict()
    for name, tensor in resumed["_trainer"].model.state_dict().items():
        assert torch.equal(tensor, final[name]), name


def test_run_dir_layout(data_cache, tiny_data, tmp_path):
    run = tmp_path / "run"
    summary = train(data_cache, run, "logging.tensorboard=true", "logging.wandb.mode=offline")
    assert (run / "config.yaml").is_file() and (run / "summary.json").is_file()
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_00000003", "step_00000006"]
    assert any((run / "tensorboard").iterdir())
    assert any((run / "wandb").rglob("*.wandb")), "wandb offline run files live in the run dir"
    assert summary["eval/ppl"] == pytest.approx(math.exp(summary["eval/loss"]))
    assert len([k for k in summary if k.startswith("eval/ppl/")]) >= 2, "per-domain perplexity"
    saved = (run / "config.yaml").read_text()
    assert "vocab_size: 512" in saved  # the resolved vocabulary
    assert json.loads((run / "summary.json").read_text())["step"] == 6


def test_keep_checkpoints_prunes_oldest(data_cache, tiny_data, tmp_path):
    run = tmp_path / "run"
    train(data_cache, run, "train.checkpoint_interval=1", "train.keep_checkpoints=2")
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_00000005", "step_00000006"]


def test_checkpoint_steps_are_saved_and_never_pruned(data_cache, tiny_data, tmp_path):
    """train.checkpoint_steps: saved off the interval, kept past keep_checkpoints (a budget sweep's branch points)."""
    run = tmp_path / "run"
    train(data_cache, run, "train.checkpoint_interval=3", "train.keep_checkpoints=1", "train.checkpoint_steps=[1, 2]")
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_00000001", "step_00000002", "step_00000006"]


def test_preemption_saves_and_resumes(data_cache, tiny_data, tmp_path, monkeypatch):
    """SIGTERM mid-run: the step finishes, a checkpoint is saved, resume matches a straight run."""
    straight = tmp_path / "straight"
    train(data_cache, straight, "train.checkpoint_interval=0")
    original = Trainer.train_step

    def step_then_signal(self):
        out = original(self)
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(Trainer, "train_step", step_then_signal)
    run = tmp_path / "run"
    summary = train(data_cache, run, "train.checkpoint_interval=0")
    assert summary["preempted"] == "SIGTERM" and summary["step"] == 2
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_00000002"]
    monkeypatch.setattr(Trainer, "train_step", original)
    train(data_cache, run, "train.checkpoint_interval=0", resume=True)
    assert losses(run) == losses(straight)


def test_corrupt_newest_checkpoint_is_skipped(data_cache, tiny_data, tmp_path, caplog):
    """A truncated newest checkpoint is set aside (kept, renamed) with a warning; resume uses the one before."""
    straight, run = tmp_path / "straight", tmp_path / "run"
    train(data_cache, straight, "train.checkpoint_interval=1", "train.keep_checkpoints=3")
    train(data_cache, run, "train.checkpoint_interval=1", "train.keep_checkpoints=3", "train.max_steps=4")
    newest = ckpt.latest_checkpoint(run)
    shard = next(newest.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    resumed = train(data_cache, run, "train.checkpoint_interval=1", "train.keep_checkpoints=3", resume=True)
    assert "resume: skipping" in caplog.text and "step_00000004" in caplog.text and "truncated" in caplog.text
    assert (run / "checkpoints" / "step_00000004.invalid" / shard.name).stat().st_size == 100, "kept, renamed"
    assert resumed["step"] == 6 and losses(run) == losses(straight)


def test_garbage_metadata_is_skipped_but_a_named_checkpoint_is_an_error(data_cache, tiny_data, tmp_path):
    run = tmp_path / "run"
    train(data_cache, run, "train.checkpoint_interval=1", "train.max_steps=3")
    named = run / "checkpoints" / "step_00000003"
    (named / ".metadata").write_bytes(b"\x80\x04garbage")
    with pytest.raises(
        CheckpointError, match=r"step_00000003: checkpoint is corrupt \(\.metadata is missing or fails its checksum"
    ):
        single_process_trainer(tiny_config(data_cache, run, "train.max_steps=4"), checkpoint=named)
    assert named.is_dir(), "a checkpoint the user named is never set aside"
    trainer = single_process_trainer(tiny_config(data_cache, run, "train.max_steps=4"), resume=True)
    assert trainer.step == 2 and (run / "checkpoints" / "step_00000003.invalid").is_dir()


def test_only_corrupt_checkpoints_is_a_clear_error(data_cache, tiny_data, tmp_path):
    run = tmp_path / "run"
    train(data_cache, run, "train.max_steps=3")
    shard = next(ckpt.latest_checkpoint(run).glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"--resume: no checkpoint in"):
        train(data_cache, run, "train.max_steps=4", resume=True)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000003.invalid"]


def test_resume_from_an_older_checkpoint_sets_later_ones_aside(data_cache, tiny_data, tmp_path):
    """--resume-from: the run continues from the named checkpoint and reproduces the steps after it."""
    run, every = tmp_path / "run", ["train.checkpoint_interval=1", "train.keep_checkpoints=6"]
    train(data_cache, run, *every)
    before = losses(run)
    named = run / "checkpoints" / "step_00000003"
    trainer = single_process_trainer(tiny_config(data_cache, run, *every), checkpoint=named)
    assert trainer.step == 3
    trainer.fit()
    assert losses(run) == before
    assert [p.name for p in ckpt.list_checkpoints(run)] == [f"step_0000000{i}" for i in range(1, 7)]
    assert {p.name for p in (run / "checkpoints").glob("*.superseded")} == {
        f"step_0000000{i}.superseded" for i in (4, 5, 6)
    }


def test_incompatible_checkpoint_names_the_key(data_cache, tiny_data, tmp_path):
    run = tmp_path / "run"
    train(data_cache, run, "train.max_steps=3")
    with pytest.raises(CheckpointError, match=r"incompatible with the config: model.d_model=32 \(config has 64\)"):
        train(data_cache, run, "train.max_steps=4", "model.d_model=64", resume=True)


def test_checkpoint_older_than_a_key_resumes(data_cache, tiny_data, tmp_path):
    """A checkpoint saved before a config key existed matches that key's default, and only its default."""
    run = tmp_path / "run"
    train(data_cache, run, "train.max_steps=3")
    meta_path = ckpt.latest_checkpoint(run) / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["moe"]["log_per_expert"]  # as if saved by a megamoe without moe.log_per_expert
    assert "init_from" not in meta["model"]  # start-up keys are not part of the architecture
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"moe.log_per_expert=False \(config has True\)"):
        train(data_cache, run, "train.max_steps=4", "moe.log_per_expert=true", resume=True)
    train(data_cache, run, "train.max_steps=4", resume=True)
    assert ckpt.latest_checkpoint(run).name == "step_00000004"


def test_resume_without_checkpoint_and_overwrite_guard(data_cache, tiny_data, tmp_path):
    with pytest.raises(MegamoeError, match="--resume: no checkpoint in"):
        train(data_cache, tmp_path / "empty", resume=True)
    run = tmp_path / "run"
    train(data_cache, run, "train.max_steps=3")
    with pytest.raises(MegamoeError, match="already holds checkpoints; pass --resume"):
        train(data_cache, run)


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run `python -m megamoe ...` as a user would."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "megamoe", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_cli_train_smoke(data_cache, tiny_data, tmp_path):
    """`megamoe train` on the embedded corpus: trains, reports perplexity, resumes from its run dir."""
    overrides = [*TINY, f"data.cache_dir={data_cache}", "logging.wandb.mode=offline"]
    res = cli("train", *overrides, "train.name=smoke", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "validation perplexity" in res.stdout and "unigram baseline" in res.stdout
    run_dir = Path(res.stdout.strip().splitlines()[-1].split("run directory: ")[1])
    assert run_dir.parent.name == "runs" and run_dir.name.startswith("smoke-")
    res = cli("train", str(tmp_path / run_dir), "train.max_steps=8", "--resume", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / run_dir / "summary.json").read_text())["step"] == 8


def test_cli_dry_run_world_size(tmp_path):
    """--dry-run --world-size validates the layout and prints per-rank counts without any process group."""
    res = cli("train", "--dry-run", "--world-size", "4", "parallel.tensor_parallel=2", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "# layout: tp2-dp2 on 4 rank(s), 1 micro-batch(es) per step" in res.stdout
    # matrices halve, the 9 norm scales (9 × 256 = 2,304) stay whole: (5,310,720 - 2,304) / 2 + 2,304
    assert "# parameters per rank: 2,656,512 (model replicas: 2)" in res.stdout
    bad = cli("train", "--dry-run", "--world-size", "4", "parallel.tensor_parallel=3", cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "megamoe: error: parallel.tensor_parallel: (3) must divide the world size (4)"


def test_export_round_trip(data_cache, tiny_data, tmp_path):
    """export → load: the same logits as the trained model; the export folder is complete."""
    from megamoe.train.export import export_run, load_exported

    run = tmp_path / "run"
    trained = train(data_cache, run)["_trainer"].model.eval()
    out = export_run(run, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    tokens = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(load_exported(out)(tokens).logits_BLV, trained(tokens).logits_BLV, rtol=0, atol=0)
    res = cli("export", str(run), "--out", str(out), cwd=tmp_path)
    assert res.returncode == 0 and "already holds the export" in res.stderr


def test_checkpoint_metadata_is_not_unpickled_freely(data_cache, tiny_data, tmp_path):
    """A .metadata that names any other callable is refused, never executed."""
    import pickle

    run = tmp_path / "run"
    train(data_cache, run, "train.max_steps=3")
    latest = ckpt.latest_checkpoint(run)

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    (latest / ".metadata").write_bytes(pickle.dumps(Evil()))
    meta = json.loads((latest / "meta.json").read_text())  # a forger can update the checksum too
    forged = (latest / ".metadata").read_bytes()
    meta["files"][".metadata"] = [len(forged), zlib.crc32(forged)]
    (latest / "meta.json").write_text(json.dumps(meta))
    refused = r"corrupt or incomplete .*metadata refers to posix.system, which is not allowed"
    with pytest.raises(CheckpointError, match=refused):
        single_process_trainer(tiny_config(data_cache, run, "train.max_steps=4"), checkpoint=latest)
    with pytest.raises(CheckpointError, match="--resume: no checkpoint in"):  # set aside as invalid
        train(data_cache, run, "train.max_steps=4", resume=True)
    assert not (tmp_path / "pwned").exists()


def test_cli_dry_run_and_config(tmp_path):
    res = cli("train", "--dry-run", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "d_model: 256" in res.stdout and "vocab_size: 4096" in res.stdout
    assert "# parameters: total 5,310,720 | active 5,310,720" in res.stdout
    assert not (tmp_path / "runs").exists(), "a dry run writes nothing"
    keys = cli("config", "--keys", cwd=tmp_path)
    assert "| `optim.lr` | float | `0.003` |" in keys.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["train", "model.d_modle=64"],
            "megamoe: error: model.d_modle: unknown config key (in a command-line override); "
            "did you mean 'model.d_model'?",
        ),
        (["train", "optim.lr=-1", "--dry-run"], "megamoe: error: optim.lr: must be > 0, got -1.0"),
        (["train", "missing.yaml"], "megamoe: error: config file"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, args, message):
    res = cli(*args, cwd=tmp_path)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), res.stderr


def test_diverging_run_stops_with_one_line_and_good_checkpoints(data_cache, tiny_data, tmp_path):
    """lr 1e30 without clipping (the weights overflow at once): the first non-finite gradient stops the
    run (exit 3) naming the newest checkpoint with finite weights, which holds the state before the bad step; no
    checkpoint holds non-finite weights."""
    run = tmp_path / "run"
    args = ["optim.lr=1e30", "optim.grad_clip=0", "train.max_steps=40", "train.checkpoint_interval=1"]
    res = cli("train", *TINY, f"data.cache_dir={data_cache}", f"train.run_dir={run}", *args, cwd=tmp_path)
    assert res.returncode == 3, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.startswith("megamoe: error")]
    assert len(lines) == 1 and "non-finite" in lines[0], res.stderr
    assert "the newest checkpoint with finite weights is" in lines[0], lines[0]
    bad_step = int(lines[0].split("step ")[1].split(":")[0])
    saved = ckpt.list_checkpoints(run)
    assert saved[-1].name == f"step_{bad_step - 1:08d}" and str(saved[-1]) in lines[0]
    assert len(saved) == min(2, bad_step - 1), "the good checkpoints before it are kept, not pruned by a bad one"
    for path in saved:
        model = single_process_trainer(tiny_config(data_cache, tmp_path / "check"), checkpoint=path).model
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters()), path


def test_skipped_update_changes_nothing_and_resumes_exactly(data_cache, tiny_data, tmp_path, caplog):
    """train.max_nonfinite_steps=1: a NaN gradient at step 3 (planted by a gradient hook) skips that update
    (weights and moments as after step 2) and training goes on; a resume after it is exact."""
    every = ["train.checkpoint_interval=1", "train.keep_checkpoints=6", "train.max_nonfinite_steps=1"]
    run = tmp_path / "run"
    trainer = single_process_trainer(tiny_config(data_cache, run, *every))
    weight = trainer.model.lm_head.weight
    weight.register_hook(lambda g: g * float("nan") if trainer.step == 2 else g)
    assert trainer.fit()["step"] == 6
    assert "step 3: non-finite gradient norm nan: update skipped (1 of at most 1 in a row)" in caplog.text
    states = [read_state(run, ckpt.step_dir(run, s)) for s in (2, 3)]
    for name, value in states[0].params.items():
        assert torch.equal(value, states[1].params[name]), name
    for key, value in states[0].moments.items():
        assert torch.equal(value, states[1].moments[key]), key
    assert json.loads((ckpt.step_dir(run, 6) / "meta.json").read_text())["optimizer_steps"] == 5
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpt.step_dir(run, 4), ckpt.step_dir(resumed_dir, 4))
    shutil.copy(run / "config.yaml", resumed_dir / "config.yaml")
    resumed = single_process_trainer(tiny_config(data_cache, resumed_dir, *every), resume=True)
    resumed.fit()
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, trainer.model.state_dict()[name]), name


def test_flipped_bits_in_the_newest_checkpoint_are_caught(data_cache, tiny_data, tmp_path, caplog):
    """Same size, one byte changed deep in the weights: the CRC-32 recorded at save time catches it."""
    run = tmp_path / "run"
    train(data_cache, run, "train.checkpoint_interval=1", "train.max_steps=3")
    shard = next(ckpt.step_dir(run, 3).glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert ckpt.problem(ckpt.step_dir(run, 3)) is None, "sizes and index still look fine"
    trainer = single_process_trainer(tiny_config(data_cache, run, "train.max_steps=4"), resume=True)
    assert trainer.step == 2 and f"{shard.name} is missing or fails its checksum" in caplog.text


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recompute_trains_identically(mode, data_cache, tiny_data, tmp_path):
    """train.recompute: the same logged losses and grad norms, and the same final weights, bit for bit."""
    moe = ("moe.routing=topk", "moe.num_experts=4", "moe.top_k=2", "train.max_steps=4")
    plain = train(data_cache, tmp_path / "plain", *moe)["_trainer"]
    again = train(data_cache, tmp_path / mode, *moe, f"train.recompute={mode}")["_trainer"]
    assert losses(tmp_path / mode) == losses(tmp_path / "plain")
    norms = [
        [r["train/grad_norm"] for r in read_metrics(run) if "train/grad_norm" in r]
        for run in (tmp_path / "plain", tmp_path / mode)
    ]
    assert norms[0] == norms[1]
    for (name, p), q in zip(plain.model.named_parameters(), again.model.parameters()):
        assert torch.equal(p, q), name


def test_emulated_bf16_warning_only_for_bf16_on_a_cpu_without_it():
    """The warning names the key and the fix; fp32, CUDA, native bf16 and an unknown CPU stay quiet."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    warning = emulated_bf16_warning(cpu, True, [])
    assert warning and "train.precision=bf16" in warning and "train.precision=fp32" in warning
    for args in ((cpu, False, []), (cuda, True, []), (cpu, True, ["amx_bf16"]), (cpu, True, None)):
        assert emulated_bf16_warning(*args) is None


def test_trainer_warns_of_emulated_bf16_on_this_cpu(data_cache, tiny_data, tmp_path, caplog):
    """A bf16 run on this machine's CPU warns exactly when /proc/cpuinfo shows no native bf16 (AMD here, not AMX)."""
    single_process_trainer(tiny_config(data_cache, tmp_path / "run", "train.precision=bf16", "train.device=cpu"))
    assert ("autocast emulates it" in caplog.text) == (native_bf16() == [])
