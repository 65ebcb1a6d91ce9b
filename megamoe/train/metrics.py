"""Metric sinks: <run_dir>/metrics.jsonl always, W&B (offline by default) and TensorBoard if asked."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from megamoe.config import LoggingConfig
from megamoe.errors import ConfigError
from megamoe.utils.fs import atomic_write_text

log = logging.getLogger(__name__)


def _wandb_env(run_dir: Path) -> None:
    """Keep every W&B file inside the run directory (nothing lands in $HOME)."""
    folder = str(run_dir / "wandb")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        os.environ.setdefault(var, folder)
    os.environ.setdefault("WANDB_SILENT", "true")


ROUTING_DOMAINS_FILE = "routing_domains.jsonl"
"""Lory runs: one record per evaluation, {"step": s, "L<i>": {domain: [average weight per expert]}}."""

ROUTER_HEALTH_FILE = "router_health.jsonl"
"""logging.router_health: one record per optimizer step (megamoe.train.router_probe)."""


class MetricSinks:
    """Fan one dict of scalars out to every configured sink (only on the logging rank)."""

    def __init__(self, cfg: LoggingConfig, run_dir: Path, config: dict, step: int):
        """step: where training (re)starts; records after it belong to work a crash lost and are dropped."""
        self.run_dir = run_dir
        for name in ("metrics.jsonl", ROUTING_DOMAINS_FILE, ROUTER_HEALTH_FILE):
            _truncate_after(run_dir / name, step)
        self._jsonl = open(run_dir / "metrics.jsonl", "a")  # noqa: SIM115 - closed by close()
        self._wandb = self._init_wandb(cfg, run_dir, config, step > 0)
        self._tb = self._init_tensorboard(cfg, run_dir)

    @staticmethod
    def _init_wandb(cfg: LoggingConfig, run_dir: Path, config: dict, resume: bool):
        """A W&B run, or None when logging.wandb.mode is disabled."""
        if cfg.wandb.mode == "disabled":
            return None
        _wandb_env(run_dir)
        import wandb

        (run_dir / "wandb").mkdir(exist_ok=True)
        return wandb.init(
            mode=cfg.wandb.mode,
            project=cfg.wandb.project,
            entity=cfg.wandb.entity or None,
            name=run_dir.name,
            dir=str(run_dir),
            config=config,
            id=run_dir.name,
            resume="allow" if resume else None,
        )

    @staticmethod
    def _init_tensorboard(cfg: LoggingConfig, run_dir: Path):
        """A TensorBoard SummaryWriter, or None."""
        if not cfg.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "logging.tensorboard", "needs the tensorboard package (pip install tensorboard)"
            ) from None
        return SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record scalars at an optimizer step."""
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self._jsonl.flush()
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(key, value, step)

    def table(self, filename: str, step: int, record: dict) -> None:
        """Append one structured record to <run_dir>/<filename> (JSON lines, truncated on resume like metrics)."""
        with open(self.run_dir / filename, "a") as f:
            f.write(json.dumps({"step": step, **record}) + "\n")

    def close(self) -> None:
        """Flush and close every sink."""
        self._jsonl.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()


def _records(path: Path) -> list[dict]:
    """The JSON records of a .jsonl file; a torn last line (the writer was killed mid-line) is dropped."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise
            log.warning("%s: dropping its torn last line %d (its writer was killed mid-write)", path, number)
    return records


def _truncate_after(path: Path, step: int) -> None:
    """Drop records logged after `step` (a resumed run logs those steps again)."""
    if path.is_file():
        kept = [record for record in _records(path) if record["step"] <= step]
        atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in kept))


def read_metrics(run_dir: Path, filename: str = "metrics.jsonl") -> list[dict]:
    """Every record of <run_dir>/metrics.jsonl (or another of the run's .jsonl files)."""
    path = run_dir / filename
    return _records(path) if path.is_file() else []
