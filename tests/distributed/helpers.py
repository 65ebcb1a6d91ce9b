"""Launch real multi-process worlds (torchrun, gloo on CPU) for the distributed tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 420
"""A world that has not finished by then has hung: the test fails (collectives time out at 120 s)."""


def free_port() -> int:
    """An unused TCP port for the rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(nproc: int, *args: str, timeout: int = TIMEOUT_S, env: dict | None = None) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node N ARGS`, as a user would launch it (env adds to or overrides variables)."""
    extra = dict(env or {})
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")),
        "OMP_NUM_THREADS": "1",
    }
    if "PYTHONPATH" in extra:
        extra["PYTHONPATH"] = extra["PYTHONPATH"].rstrip(os.pathsep) + os.pathsep + str(REPO)
    env.update(extra)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}"]
    return subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def check(res: subprocess.CompletedProcess) -> None:
    """Fail with the tail of the world's output if it did not exit cleanly."""
    assert res.returncode == 0, f"world failed (exit {res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"


def metrics(run_dir: Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of one metric from a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r[key]) for r in rows if key in r]
