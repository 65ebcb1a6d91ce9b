"""Training survives real kills: SIGKILL at random moments (inside saves too), and signals under torchrun.

Every run is the real CLI in its own process group; the faults are real signals. After each fault the
user's command is simply run again (with --resume once a checkpoint exists, as launch/slurm.sbatch
does), and the finished run must have logged the same loss at every step as an uninterrupted run of
the same layout, bit for bit: resuming replays exactly the computations it lost.
"""

from __future__ import annotations

import random
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest

from megamoe.train.checkpoint import checkpoints_root, latest_checkpoint, list_checkpoints
from megamoe.train.metrics import read_metrics
from tests.faults.procs import all_gone, kill_when, launch, megamoe, run, tail, wait, wait_for
from tests.util import TINY

KILLS = 20
RUN = ["train.max_steps=100", "train.eval_interval=0", "train.checkpoint_interval=1", "train.keep_checkpoints=2"]


def losses(run_dir: Path) -> dict[int, float]:
    """Train loss by step; every step must have been logged once."""
    rows = [(r["step"], r["train/loss"]) for r in read_metrics(run_dir) if "train/loss" in r]
    assert len(rows) == len(dict(rows)), "a step was logged twice"
    return dict(rows)


def train_args(cache: Path, run_dir: Path, *extra: str) -> list[str]:
    """`megamoe train` arguments of the user's command, with --resume once the run has a checkpoint."""
    resume = ["--resume"] if latest_checkpoint(run_dir) is not None else []
    return [*TINY, f"data.cache_dir={cache}", f"train.run_dir={run_dir}", *extra, *resume]


def train_command(cache: Path, run_dir: Path, *extra: str) -> list[str]:
    """The user's single-process command."""
    return megamoe("train", *train_args(cache, run_dir, *extra))


def run_to_end(cmd: list[str], log: Path, timeout: float = 300) -> None:
    """Run a command that must finish cleanly."""
    code = run(cmd, log, timeout)
    assert code == 0, f"exit {code}:\n{tail(log)}"


def steps_logged(run_dir: Path) -> int:
    """Lines in metrics.jsonl (cheap: no parsing)."""
    path = run_dir / "metrics.jsonl"
    return path.read_bytes().count(b"\n") if path.exists() else 0


class KillMoment:
    """A seeded random moment: inside a save, a little after the k-th new step, or during start-up.

    Each attempt makes at most a few steps of progress, so 20 kills land before the run can finish:
    a save missed by the 1 ms polling (they take milliseconds here) ends the wait after a few steps.
    """

    def __init__(self, rng: random.Random, run_dir: Path, startup_s: float):
        self.mode, self.run_dir, self.began = rng.choice(("save", "step", "start")), run_dir, time.monotonic()
        self.delay, self.steps, self.at = rng.uniform(0.0, 0.05), rng.randint(1, 3), rng.uniform(0.2, startup_s)
        self.lines0, self.since = steps_logged(run_dir), None
        self.in_save = False

    def __call__(self) -> bool:
        now, new_steps = time.monotonic(), steps_logged(self.run_dir) - self.lines0
        if self.mode == "save":
            self.in_save = any(checkpoints_root(self.run_dir).glob(".step_*.tmp-save"))
            return self.in_save or new_steps >= self.steps + 2
        if new_steps >= (self.steps if self.mode == "step" else 1):  # "start": at the latest, step 1
            self.since = self.since or now
        late = self.since is not None and now - self.since >= self.delay
        return late or (self.mode == "start" and now - self.began >= self.at)


@pytest.mark.slow
def test_sigkill_at_random_moments_resumes_exactly(data_cache, tiny_data, tmp_path):
    """20 seeded SIGKILLs (a third of them inside checkpoint saves), each followed by rerunning the command."""
    straight, log = tmp_path / "straight", tmp_path / "log.txt"
    began = time.monotonic()
    proc = launch(train_command(data_cache, straight, *RUN), log)
    wait_for(proc, lambda: steps_logged(straight) > 0, 300)
    startup_s = time.monotonic() - began
    assert wait(proc, 300, log) == 0, tail(log)

    run_dir, rng, kills, inside_saves = tmp_path / "killed", random.Random(15), 0, 0
    while kills < KILLS:
        proc = launch(train_command(data_cache, run_dir, *RUN), log)
        moment = KillMoment(rng, run_dir, startup_s)
        killed = kill_when(proc, moment, 300, poll_s=0.001)
        code = wait(proc, 300, log)
        assert killed, f"the run ended by itself (exit {code}) after {kills} kills:\n{tail(log)}"
        kills, inside_saves = kills + 1, inside_saves + moment.in_save
    assert inside_saves >= 3, f"only {inside_saves} kills landed inside a save"
    run_to_end(train_command(data_cache, run_dir, *RUN), log)
    assert losses(run_dir) == losses(straight)
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_00000099", "step_00000100"]
    assert sorted(p.name for p in checkpoints_root(run_dir).iterdir()) == ["step_00000099", "step_00000100"]


def ranks(launcher: psutil.Process) -> dict[int, psutil.Process]:
    """The launcher's rank processes by global rank."""
    found = {}
    for child in launcher.children():
        rank = child.environ().get("RANK")
        if rank is not None:
            found[int(rank)] = child
    return found


LAYOUT = {2: ["parallel.zero_stage=1"], 4: ["parallel.tensor_parallel=2", "parallel.zero_stage=1"]}
TORCHRUN = ["train.max_steps=8", "train.eval_interval=0", "train.checkpoint_interval=3", "train.global_batch_size=8"]


def torchrun_command(nproc: int, cache: Path, run_dir: Path) -> list[str]:
    """launch/torchrun.sh's command (megamoe's torchrun), with --resume once a checkpoint exists."""
    train = train_args(cache, run_dir, *TORCHRUN, *LAYOUT[nproc], "parallel.timeout_s=60")
    launcher = [sys.executable, "-m", "megamoe.cli.torchrun", "--standalone", f"--nproc-per-node={nproc}"]
    return [*launcher, "-m", "megamoe", "train", *train]


@pytest.fixture(scope="module")
def uninterrupted(data_cache, tiny_data, tmp_path_factory) -> dict[int, dict[int, float]]:
    """Loss by step of an uninterrupted torchrun run, for 2 and 4 ranks."""
    out = {}
    for nproc in LAYOUT:
        run_dir = tmp_path_factory.mktemp(f"straight{nproc}") / "run"
        run_to_end(torchrun_command(nproc, data_cache, run_dir), run_dir.parent / "log.txt")
        out[nproc] = losses(run_dir)
    return out


# A pairwise design over ranks × target × signal: every pair of two factors' values occurs once, so each
# target meets each signal and each layout (4 runs instead of the full 8; the layouts share the shutdown code).
CASES = [
    (2, "rank", signal.SIGTERM),
    (2, "launcher", signal.SIGKILL),
    (4, "rank", signal.SIGKILL),
    (4, "launcher", signal.SIGTERM),
]


@pytest.mark.slow
@pytest.mark.parametrize(("nproc", "who", "sig"), CASES, ids=[f"{n}ranks-{w}-{s.name}" for n, w, s in CASES])
def test_signal_under_torchrun(nproc, who, sig, uninterrupted, data_cache, tmp_path):
    """No hang, no orphan, and the rerun (started at once) finishes with exactly the uninterrupted losses.

    A launcher killed outright cannot stop its ranks: they notice it is gone at the next step, save
    and exit, and the rerun, started while they still run, waits on the run dir's lock for them.
    """
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    proc = launch(torchrun_command(nproc, data_cache, run_dir), log)
    assert wait_for(proc, lambda: steps_logged(run_dir) >= 4, 300), tail(log)
    launcher = psutil.Process(proc.pid)
    workers = list(ranks(launcher).values())
    (launcher if who == "launcher" else workers[-1]).send_signal(sig)
    code = wait(proc, 120, log)
    if sig == signal.SIGTERM and who == "rank":
        assert code == 0, tail(log)
    else:
        assert code != 0
    rerun = launch(torchrun_command(nproc, data_cache, run_dir), log)
    assert all_gone(workers, 120), f"ranks left running after the launcher ended:\n{tail(log)}"
    if sig == signal.SIGTERM or who == "launcher":  # the ranks finished their step and saved there
        assert "saved" in log.read_text(), tail(log)
    assert wait(rerun, 300, log) == 0, tail(log)
    assert losses(run_dir) == uninterrupted[nproc]
