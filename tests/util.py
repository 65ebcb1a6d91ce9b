"""Shared test helpers: tiny configs and prepared tiny data."""

from __future__ import annotations

from pathlib import Path

from megamoe.config import Config, load_config

TINY = [
    "model.d_model=32",
    "model.num_layers=2",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.seq_len=32",
    "data.max_documents=60",
    "data.vocab_size=512",
    "data.val_fraction=0.1",
    "train.micro_batch_size=2",
    "train.global_batch_size=4",
    "train.max_steps=6",
    "train.eval_interval=3",
    "train.eval_batches=2",
    "train.checkpoint_interval=3",
    "optim.warmup_steps=2",
    "logging.log_interval=1",
    "logging.progress=false",
    "logging.wandb.mode=disabled",
]
"""Overrides for a model and corpus small enough for a unit test."""


def tiny_config(cache_dir: Path, run_dir: Path | None = None, *extra: str) -> Config:
    """The tiny config with its data cache (and run dir) in test folders."""
    overrides = [*TINY, f"data.cache_dir={cache_dir}"]
    if run_dir is not None:
        overrides.append(f"train.run_dir={run_dir}")
    return load_config(None, [*overrides, *extra])


def single_process_trainer(cfg: Config, resume: bool = False, checkpoint: Path | None = None):
    """A Trainer for cfg in this process (the single-process reference layout), optionally from a checkpoint."""
    import torch

    from megamoe.parallel.groups import local_groups
    from megamoe.parallel.layout import resolve_layout
    from megamoe.train.run import setup_run
    from megamoe.train.trainer import Trainer

    groups = local_groups(resolve_layout(cfg, 1), torch.device("cpu"))
    return Trainer(setup_run(cfg, resume=resume, progress=False, checkpoint=checkpoint), groups)


PROSE = ("the", "cat", "sat", "on", "a", "mat", "while", "dogs", "ran", "over", "green", "hills", "and", "rivers")


def write_source(path: Path, kind: str, documents: int = 40) -> Path:
    """A small deterministic .jsonl corpus: 'prose' (sentences) or 'code' (Python functions), for blend tests."""
    import json
    import random

    rng = random.Random(f"{kind}-{documents}")

    def document(i: int) -> str:
        if kind == "prose":
            return " ".join(rng.choice(PROSE) for _ in range(80 + i)) + "."
        return "\n".join(f"def f{i}_{j}(x):\n    return x * {rng.randint(0, 99)} + {j}" for j in range(4 + i % 5))

    path.write_text("".join(json.dumps({"text": document(i)}) + "\n" for i in range(documents)))
    return path


def blend_override(*sources: tuple[Path, float]) -> str:
    """The data.blend=[...] override of (path, weight) pairs."""
    entries = ", ".join(f"{{path: '{path}', weight: {weight}}}" for path, weight in sources)
    return f"data.blend=[{entries}]"
