"""Training against a hostile environment: a full disk mid-save, a poisoned DeepSpeed build, bad input under torchrun.

Real filesystems and processes: a size-limited tmpfs mounted as root (or, where mounting is not
allowed, a real RLIMIT_FSIZE), a real stale torch-extension lock, real torchrun worlds.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from megamoe.train.checkpoint import checkpoints_root, list_checkpoints, problem
from tests.distributed.parity import read_state
from tests.faults.procs import REPO, env, file_limit, fill, kill_when, launch, run, tail, wait
from tests.faults.test_train_faults import losses, torchrun_command, train_command

FEW = ["train.max_steps=6", "train.eval_interval=0", "train.checkpoint_interval=2", "train.keep_checkpoints=2"]


@pytest.mark.slow
def test_full_disk_during_checkpoint_save(data_cache, tiny_data, tmp_path, small_disk):
    """One clear line and exit 2; the previous checkpoint intact; after freeing space the rerun is exact.

    The run moves onto a tmpfs filled to leave 256 KiB (the next checkpoint needs ~850 KiB), or runs
    under RLIMIT_FSIZE = 256 KiB where mounting is not permitted.
    """
    straight, run_dir, log = tmp_path / "straight", tmp_path / "run_dir", tmp_path / "log.txt"
    assert run(train_command(data_cache, straight, *FEW), log, 300) == 0, tail(log)
    first = launch(train_command(data_cache, run_dir, *FEW), log)  # stopped once its first checkpoint is complete
    assert kill_when(first, lambda: (run_dir / "checkpoints" / "step_00000002" / "meta.json").exists(), 300), tail(log)
    wait(first, 60, log)
    limit = None
    if small_disk:
        run_dir = shutil.copytree(run_dir, small_disk / "run_dir")
        fill(small_disk, leave=256 * 1024)
    else:
        limit = file_limit(256 * 1024)
    cmd = train_command(data_cache, run_dir, *FEW)
    res = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=300, preexec_fn=limit)
    assert res.returncode == 2, res.stderr[-3000:]
    lines = [line for line in res.stderr.splitlines() if line.startswith("megamoe: error")]
    assert len(lines) == 1, res.stderr[-3000:]
    assert "step_00000004: could not write the checkpoint" in lines[0], lines[0]
    assert "the newest complete checkpoint is" in lines[0] and "step_00000002" in lines[0], lines[0]
    if small_disk:  # the message says how full the filesystem is
        assert float(lines[0].split(" MiB free on its filesystem")[0].rsplit(" ", 1)[1]) < 1.0, lines[0]
        (small_disk / "filler").unlink()  # the user frees space
    assert [p.name for p in checkpoints_root(run_dir).iterdir()] == ["step_00000002"], "no temp left behind"
    assert problem(list_checkpoints(run_dir)[-1]) is None
    assert run(train_command(data_cache, run_dir, *FEW), log, 300) == 0, tail(log)
    assert losses(run_dir) == losses(straight)


@pytest.mark.slow
def test_start_after_a_killed_extension_build_is_bounded(data_cache, tiny_data, tmp_path):
    """kill -9 while DeepSpeed's CPU op compiles (in a fresh extensions folder) leaves torch's lock file;
    the next data-parallel start removes it and finishes instead of waiting on it forever."""
    extensions, run_dir, log = tmp_path / "torch_extensions", tmp_path / "run", tmp_path / "log.txt"
    cmd, environ = torchrun_command(2, data_cache, run_dir), env(TORCH_EXTENSIONS_DIR=str(extensions))
    proc = launch([*cmd, "train.max_steps=3"], log, environ=environ)
    batons = lambda: list(extensions.glob("*/lock"))  # noqa: E731
    assert kill_when(proc, lambda: bool(batons()), 300), f"no build started:\n{tail(log)}"
    wait(proc, 60, log)
    assert batons(), "the killed build left its lock file (the state this test is about)"
    code = run([*cmd, "train.max_steps=3"], log, 600, environ=environ)
    assert code == 0, tail(log)
    assert not batons() and "was killed and left it" in log.read_text()


def test_bad_config_under_torchrun_is_one_line(data_cache, tmp_path):
    """megamoe's torchrun checks the config once before starting ranks: one line, exit 2, no traceback."""
    cmd = torchrun_command(2, data_cache, tmp_path / "run")
    res = subprocess.run([*cmd, "model.d_modle=64"], env=env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("megamoe: error: model.d_modle: unknown config key")
    assert "Traceback" not in res.stderr and res.stderr.count("megamoe: error") == 1, res.stderr


def test_bad_config_under_plain_torchrun_prints_once(data_cache, tmp_path):
    """Under plain torchrun every rank fails the same way; only rank 0 prints the line."""
    cmd = torchrun_command(2, data_cache, tmp_path / "run")
    plain = [sys.executable, "-m", "torch.distributed.run", *cmd[3:]]
    res = subprocess.run([*plain, "optim.lr=-1"], env=env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert res.stderr.count("megamoe: error: optim.lr: must be > 0, got -1.0") == 1, res.stderr


@pytest.mark.slow
def test_diverging_run_under_torchrun_stops_on_every_rank(data_cache, tiny_data, tmp_path):
    """dp2, lr 1e30 without clipping: the ranks agree on the first non-finite gradient norm, all stop with
    exit 3 at the same step, the error is printed once, and every checkpoint kept holds finite weights."""
    run_dir = tmp_path / "run"
    args = ["optim.lr=1e30", "optim.grad_clip=0", "train.checkpoint_interval=1", "train.max_steps=30"]
    cmd = torchrun_command(2, data_cache, run_dir)
    res = subprocess.run([*cmd, *args], env=env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 3, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("megamoe: error")]
    assert len(errors) == 1 and "non-finite gradient norm" in errors[0], res.stderr[-3000:]
    # the first rank out exits 3; torchrun may SIGTERM the other while it tears down after the same verdict
    assert "rank 0 " in res.stderr and "failed with exit code 3" in res.stderr
    saved = list_checkpoints(run_dir)
    assert saved and str(saved[-1]) in errors[0]
    for path in saved:
        assert all(torch.isfinite(t).all() for t in read_state(run_dir, path).params.values()), path
