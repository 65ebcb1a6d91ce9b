"""Where a sweep run stands (done, resume, new), and a cooldown branch's start from its trunk's checkpoint.

A run is done when its summary.json reports train.max_steps; it resumes when its directory holds a
checkpoint; otherwise it is new. A new branch first gets the trunk's branch-point checkpoint: each
file hard-linked (checkpoints are never modified in place, only renamed and deleted), else copied,
into a hidden temp folder renamed to checkpoints/step_N once complete, so a kill leaves no half
checkpoint under that name. It then resumes from it like any interrupted run.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from megamoe.errors import CheckpointError
from megamoe.sweep.archive import is_done
from megamoe.sweep.spec import Branch
from megamoe.train.checkpoint import latest_checkpoint, problem, step_dir
from megamoe.utils.fs import atomic_dir, remove_dead_temps


def run_state(run_dir: Path, max_steps: int) -> str:
    """done, resume or new."""
    if is_done(run_dir, max_steps):
        return "done"
    return "resume" if latest_checkpoint(run_dir) is not None else "new"


def start_state(run_dir: Path, max_steps: int, branch: Branch | None) -> str:
    """run_state, after giving a new branch its trunk's checkpoint (then: resume)."""
    state = run_state(run_dir, max_steps)
    if state == "new" and branch is not None:
        link_branch_point(branch, run_dir)
        return "resume"
    return state


def link_branch_point(branch: Branch, run_dir: Path) -> Path:
    """Put the trunk's checkpoint of branch.step into run_dir/checkpoints, atomically; returns it."""
    source = step_dir(branch.trunk_dir, branch.step)
    if not (source / "meta.json").is_file():
        raise CheckpointError(
            f"{source}: the trunk {branch.trunk} has no checkpoint at step {branch.step}, where {run_dir.name} "
            "branches off (the trunk saves it on its way: run the trunk first; a trunk trained before this "
            "budget was added lacks it)"
        )
    if why := problem(source):
        raise CheckpointError(f"{source}: the trunk's checkpoint at the branch point is unusable ({why})")
    final = step_dir(run_dir, branch.step)
    remove_dead_temps(final)  # what a killed link or copy left
    with atomic_dir(final) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True, copy_function=_link_or_copy)
    return final


def _link_or_copy(src: str, dst: str) -> None:
    """Hard-link src at dst; copy it where links are impossible (another filesystem, no permission)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
