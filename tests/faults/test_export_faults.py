"""`megamoe export RUN --out DIR` under kill -9 at seeded moments and a full disk.

--out is always either absent or a complete export byte-identical to an uninterrupted one; an
existing export is refused and never touched; a rerun finishes with no cleanup by hand.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from tests.faults.procs import file_limit, fill, kill_when, launch, megamoe, run, settled, tail
from tests.faults.test_data_faults import digest, moments
from tests.util import single_process_trainer, tiny_config

BIG = ["model.d_model=256", "model.num_heads=4", "train.max_steps=1", "optim.warmup_steps=0"]
"""A model of ~10 MB: writing and syncing it takes long enough to be killed in the middle of it."""


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, data_cache, tiny_data):
    """A one-step run of the tiny config at d_model 256, with its checkpoint."""
    run_dir = tmp_path_factory.mktemp("export") / "run"
    single_process_trainer(tiny_config(data_cache, run_dir, *BIG)).fit()
    return run_dir


def export(run_dir: Path, out: Path, fmt: str = "megamoe") -> list[str]:
    """The `megamoe export` command line."""
    return megamoe("export", str(run_dir), "--out", str(out), "--format", fmt)


def temps_of(out: Path) -> list[str]:
    """Hidden temp dirs of exports to out."""
    return sorted(p.name for p in out.parent.glob(f".{out.name}.tmp-*"))


def stage(out: Path) -> str:
    """How far a killed export to out had got."""
    if out.exists():
        return "renamed"
    found = [out.parent / n for n in temps_of(out)]
    if not found:
        return "loading"
    return "weights written" if any((t / "model.safetensors").exists() for t in found) else "writing"


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["megamoe", "hf"])
def test_kill9_during_export_then_rerun(fmt, trained_run, tmp_path):
    """SIGKILL at 3 seeded moments over an export's duration and at 2 chosen stages; each rerun finishes.

    Both formats are byte-reproducible (transformers' save_pretrained included), so digests compare."""
    good, out, log = tmp_path / "good", tmp_path / "out", tmp_path / "export.log"
    started = time.monotonic()
    assert run(export(trained_run, good, fmt), log) == 0, tail(log)
    duration = time.monotonic() - started
    ref = digest(good)
    readies = [lambda t0, t=t: time.monotonic() - t0 >= t for t in moments(3, 3, duration)]
    readies += [lambda t0: bool(temps_of(out)), lambda t0: stage(out) == "weights written"]
    hits = []
    for ready in readies:
        t0 = time.monotonic()
        proc = launch(export(trained_run, out, fmt), log)
        killed = kill_when(proc, lambda r=ready, t=t0: r(t), 120)
        proc.wait()
        assert settled(proc)
        hits.append(stage(out) if killed else "finished first")
        assert not out.exists() or digest(out) == ref, f"a half-written export under its final name ({hits[-1]})"
        assert digest(good) == ref
        assert run(export(trained_run, out, fmt), log) == 0, tail(log)
        assert digest(out) == ref and temps_of(out) == [], f"after a kill at '{hits[-1]}': {temps_of(out)}"
        shutil.rmtree(out)
    print("stages hit:", hits)
    assert "loading" in hits, hits


@pytest.mark.slow
def test_an_existing_folder_is_never_touched(trained_run, tmp_path):
    """The same export again: nothing to do. Any other existing folder: refused. Neither is modified."""
    good, other, log = tmp_path / "good", tmp_path / "other", tmp_path / "export.log"
    assert run(export(trained_run, good), log) == 0, tail(log)
    ref, stamp = digest(good), (good / "model.safetensors").stat().st_mtime_ns
    assert run(export(trained_run, good), log) == 0, tail(log)
    assert "already holds the export of" in log.read_text()
    assert digest(good) == ref and (good / "model.safetensors").stat().st_mtime_ns == stamp
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert run(export(trained_run, other), log) == 2
    assert f"megamoe: error: --out: {other} already exists and is not the export of" in log.read_text()
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["megamoe", "hf"])
def test_full_disk_during_export(fmt, trained_run, tmp_path, small_disk):
    """No room for the weights (a full tmpfs, else a file-size limit): one clear line, exit 2, nothing kept."""
    disk = small_disk or tmp_path / "disk"
    out, log = disk / "model", tmp_path / "export.log"
    reason = "no space left on device" if small_disk else "file too large"
    if small_disk:
        fill(disk, 1 << 20)
        rc = run(export(trained_run, out, fmt), log)
    else:
        rc = run(export(trained_run, out, fmt), log, preexec_fn=file_limit(1 << 20))
    text = log.read_text()
    errors = [line for line in text.splitlines() if line.startswith("megamoe: error:")]
    assert rc == 2 and len(errors) == 1 and "Traceback" not in text, text[-3000:]
    assert reason in errors[0] and str(out) in errors[0] and "nothing was kept" in errors[0], errors[0]
    assert not out.exists() and temps_of(out) == []
    (disk / "filler").unlink(missing_ok=True)
    assert run(export(trained_run, out, fmt), log) == 0, tail(log)
