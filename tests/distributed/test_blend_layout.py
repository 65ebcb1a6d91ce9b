"""A weighted blend trains identically at data-parallel degree 2 and in one process (the same global batches).

Each rank reads its contiguous share of the blend's global batch, so the losses, gradient norms,
per-source evaluations and realized shares of a dp2 run equal the single-process run's (fp32 RTOL,
tests/distributed/parity.py). A rank that drew its own blend (or its sources' own positions) would
train on other sequences: its losses would differ by far more than RTOL.
"""

from __future__ import annotations

from tests.distributed.helpers import check, metrics, torchrun
from tests.distributed.parity import check_final, check_trajectory
from tests.util import TINY, blend_override, single_process_trainer, tiny_config, write_source

COMMON = ["train.global_batch_size=8", "parallel.timeout_s=120", "parallel.zero_stage=0"]
KEYS = (
    "train/loss", "train/grad_norm", "eval/loss", "eval/prose/loss", "eval/code/loss",
    "data/share/prose", "data/share/code",
)  # fmt: skip


def test_blend_dp2_matches_single_process(tmp_path):
    paths = [write_source(tmp_path / f"{name}.jsonl", name) for name in ("prose", "code")]
    blend, cache = blend_override((paths[0], 3), (paths[1], 1)), tmp_path / "cache"
    trainer = single_process_trainer(tiny_config(cache, tmp_path / "single", blend, *COMMON))
    trainer.fit()
    reference = {
        "metrics": {key: metrics(tmp_path / "single", key) for key in KEYS},
        "params": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
    }
    args = [*TINY, *COMMON, blend, f"data.cache_dir={cache}", f"train.run_dir={tmp_path / 'dp2'}"]
    check(torchrun(2, "-m", "megamoe", "train", *args))
    check_trajectory(tmp_path / "dp2", reference, KEYS)
    check_final(tmp_path / "dp2", reference, trainer.cfg)
