"""aux_free balancing: every MoE layer's per-expert bias over training, read from a run's metrics.jsonl.

Shape legend: S logged steps, E experts.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

KEY = re.compile(r"moe/L(\d+)/bias/e(\d+)")


def bias_trajectories(run_dir: Path) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per layer: (steps_S, bias_SE) from the logged moe/L<i>/bias/e<j> values (empty without aux_free)."""
    path = run_dir / "metrics.jsonl"
    rows: dict[int, dict[int, dict[int, float]]] = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        record = json.loads(line) if line.strip() else {}
        for key, value in record.items():
            if match := KEY.fullmatch(key):
                layer, expert = int(match[1]), int(match[2])
                rows.setdefault(layer, {}).setdefault(int(record["step"]), {})[expert] = value
    out = {}
    for layer, by_step in sorted(rows.items()):
        steps = sorted(by_step)
        experts = max(max(v) for v in by_step.values()) + 1
        out[layer] = (np.array(steps), np.array([[by_step[s].get(e, np.nan) for e in range(experts)] for s in steps]))
    return out
