"""Training against a hostile environment: a full disk mid-save, a poisoned DeepSpeed build, bad input under torchrun.

Real filesystems and processes: a size-limited tmpfs mounted as root (or, where mounting is not
allowed, a real RLIMIT_FSIZE), a real stale torch-extension lock, real torchrun worlds.
"""

from __future__ import annotations

import contextlib
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megamoe.train.checkpoint import checkpoints_root, list_checkpoints, problem
from tests.faults.procs import REPO, env, kill_when, start, tail, wait
from tests.faults.test_train_faults import losses, torchrun_command, train_command

FEW = ["train.max_steps=6", "train.eval_interval=0", "train.checkpoint_interval=2", "train.keep_checkpoints=2"]


def mount_tmpfs(where: Path, size_kb: int) -> bool:
    """Mount a tmpfs of size_kb at where (root only); False where mounting is not permitted."""
    where.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(where)], capture_output=True)
    return res.returncode == 0


def disk_usage_kb(folder: Path) -> int:
    """Bytes under folder, in KiB, rounded up."""
    return -(-sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) // 1024)


@contextlib.contextmanager
def nearly_full(run_dir: Path, tmp_path: Path):
    """run_dir moved onto a filesystem with ~256 KiB to spare (the next checkpoint needs ~800 KiB).

    Yields (run_dir on the small filesystem, preexec_fn) where preexec_fn is None with a real tmpfs, or
    sets RLIMIT_FSIZE to 256 KiB where mounting is not permitted (writes past it fail with EFBIG).
    """
    small = tmp_path / "small"
    if mount_tmpfs(small, disk_usage_kb(run_dir) + 256):
        try:
            moved = small / run_dir.name
            shutil.copytree(run_dir, moved)
            yield moved, None
        finally:
            subprocess.run(["umount", "-l", str(small)], check=False)
        return

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, resource.RLIM_INFINITY))

    yield run_dir, limit


@pytest.mark.slow
def test_full_disk_during_checkpoint_save(data_cache, tiny_data, tmp_path):
    """One clear line and exit 2; the previous checkpoint intact; after freeing space the rerun is exact."""
    straight, run, log = tmp_path / "straight", tmp_path / "run", tmp_path / "log.txt"
    assert wait(start(train_command(data_cache, straight, *FEW), log), 300, log) == 0, tail(log)
    first = start(train_command(data_cache, run, *FEW), log)  # stopped once its first checkpoint is complete
    assert kill_when(first, lambda: (run / "checkpoints" / "step_00000002" / "meta.json").exists(), 300), tail(log)
    wait(first, 60, log)
    with nearly_full(run, tmp_path) as (small_run, preexec):
        cmd = train_command(data_cache, small_run, *FEW)
        res = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=300, preexec_fn=preexec)
        assert res.returncode == 2, res.stderr[-3000:]
        lines = [line for line in res.stderr.splitlines() if line.startswith("megamoe: error")]
        assert len(lines) == 1, res.stderr[-3000:]
        assert "step_00000004: could not write the checkpoint" in lines[0], lines[0]
        if preexec is None:  # the tmpfs: the message says how full the filesystem is
            assert float(lines[0].split(" MiB free on its filesystem")[0].rsplit(" ", 1)[1]) < 1.0, lines[0]
        assert "the newest complete checkpoint is" in lines[0] and "step_00000002" in lines[0], lines[0]
        assert [p.name for p in checkpoints_root(small_run).iterdir()] == ["step_00000002"], "no temp left behind"
        assert problem(list_checkpoints(small_run)[-1]) is None
        shutil.rmtree(run)
        shutil.copytree(small_run, run)  # the user frees space: here, by moving the run back
    assert wait(start(train_command(data_cache, run, *FEW), log), 300, log) == 0, tail(log)
    assert losses(run) == losses(straight)


@pytest.mark.slow
def test_start_after_a_killed_extension_build_is_bounded(data_cache, tiny_data, tmp_path):
    """kill -9 while DeepSpeed's CPU op compiles (in a fresh extensions folder) leaves torch's lock file;
    the next data-parallel start removes it and finishes instead of waiting on it forever."""
    extensions, run, log = tmp_path / "torch_extensions", tmp_path / "run", tmp_path / "log.txt"
    cmd, environ = torchrun_command(2, data_cache, run), env(TORCH_EXTENSIONS_DIR=str(tmp_path / "torch_extensions"))
    proc = start([*cmd, "train.max_steps=3"], log, environ)
    batons = lambda: list(extensions.glob("*/lock"))  # noqa: E731
    assert kill_when(proc, lambda: bool(batons()), 300), f"no build started:\n{tail(log)}"
    wait(proc, 60, log)
    assert batons(), "the killed build left its lock file (the state this test is about)"
    code = wait(start([*cmd, "train.max_steps=3"], log, environ), 600, log)
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
