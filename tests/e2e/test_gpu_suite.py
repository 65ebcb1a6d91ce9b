"""bench/gpu_suite.sh cannot run here (no GPU): check it parses and every command it runs accepts its arguments."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_suite.sh"


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_every_step_accepts_its_arguments():
    """Each `step NAME SECONDS "$PY" -m MODULE ARGS` parses its ARGS (argparse with --help appended)."""
    steps = re.findall(r'^step (\S+) (\d+) "\$PY" -m (\S+)(.*)$', SCRIPT.read_text(), re.M)
    assert {name for name, *_ in steps} >= {"doctor", "kernel_tests", "lory_merge", "gpu_models", "peer_moe_layers"}
    assert sum(int(limit) for _, limit, *_ in steps) <= 600, "the suite must fit in 10 minutes of device time"
    for name, _, module, args in steps:
        if module == "pytest":
            continue
        cmd = [sys.executable, "-m", module, *shlex.split(args.replace('"$PY"', "")), "--help"]
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, f"{name}: {res.stderr[-2000:]}"
