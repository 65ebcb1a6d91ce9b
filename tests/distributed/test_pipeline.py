"""Pipeline parallelism: every pipeline layout trains exactly like the single-process run.

4 blocks, 8 sequences per step (4 pipeline micro-batches of 2 per data-parallel rank), 6 steps,
a checkpoint after every step. tests/distributed/parity.py compares each step from the layout's own
state (loss, grad norm, every tensor's gradient and second moment, the AdamW update) and the
trajectory with single-process math, with the tolerances derived there. What crosses stages is
covered: MoE aux losses injected on each stage (top-2 with balance and z losses), RMoE's GRU summed
over the stages, tied embeddings on the first and last stage, Lory's dense warm-up → upcycle switch
inside the run, GRIN's layout-independent sampling, and activation recompute on the way.
"""

from __future__ import annotations

import shutil

import pytest

from megamoe.train.export import export_run, load_exported, load_run_model
from megamoe.train.metrics import read_metrics
from tests.distributed.helpers import check, torchrun
from tests.distributed.parity import check_trajectory
from tests.distributed.test_layouts import COMMON, assert_layout_matches, launch, launch_layouts
from tests.distributed.test_moe import make_reference
from tests.util import single_process_trainer, tiny_config

PP = ["model.num_layers=4", "parallel.zero_stage=0", "train.checkpoint_interval=1", "train.keep_checkpoints=6"]
MOE = ["moe.routing=topk", "moe.num_experts=4", "moe.top_k=2", "moe.balance_loss_coef=0.01", "moe.z_loss_coef=0.001"]
FAMILIES = {
    "dense": [],
    "tied": ["model.tie_embeddings=true"],
    "topk": MOE,
    "grin": ["moe.routing=sparsemixer", "moe.num_experts=4", "moe.top_k=2", "moe.jitter_eps=0.3",
             "moe.balance_loss_level=micro_batch"],
    "rmoe": [*MOE, "moe.scorer=gru", "moe.gru_hidden=16"],
    "lory": ["moe.routing=lory", "moe.num_experts=4", "moe.segment_length=8", "moe.dense_warmup_fraction=0.34"],
    "auxfree": [*MOE, "moe.score_fn=sigmoid", "moe.renormalize=true", "moe.balance=aux_free",
                "moe.bias_update_rate=0.01", "moe.num_groups=2", "moe.topk_groups=1"],
}  # fmt: skip
KEYS = ("train/loss", "train/grad_norm", "eval/loss")
P2 = "parallel.pipeline_parallel=2"
LAYOUTS = {
    "dense-pp2-1f1b": ("dense", 2, [P2]),
    "dense-pp4-gpipe-selective": ("dense", 4, ["parallel.pipeline_parallel=4", "parallel.pipeline_schedule=gpipe",
                                               "train.recompute=selective"]),
    "dense-pp2-interleaved": ("dense", 2, [P2, "parallel.pipeline_schedule=interleaved_1f1b",
                                           "parallel.virtual_stages=2"]),
    "dense-pp2-dp2-split": ("dense", 4, [P2, "parallel.pipeline_split=1,3"]),
    "dense-pp2-tp2-sp-full": ("dense", 4, [P2, "parallel.tensor_parallel=2", "parallel.sequence_parallel=true",
                                           "train.recompute=full"]),
    "tied-pp2-interleaved": ("tied", 2, [P2, "parallel.pipeline_schedule=interleaved_1f1b",
                                         "parallel.virtual_stages=2"]),
    "topk-pp2-ep2": ("topk", 4, [P2, "parallel.expert_parallel=2"]),
    "grin-pp2": ("grin", 2, [P2]),
    "rmoe-pp2-full": ("rmoe", 2, [P2, "train.recompute=full"]),
    "lory-pp2-selective": ("lory", 2, [P2, "train.recompute=selective"]),
    "auxfree-pp2": ("auxfree", 2, [P2]),
    "tied-pp2-tp2-sp-fused-loss": ("tied", 4, [P2, "parallel.tensor_parallel=2", "parallel.sequence_parallel=true",
                                               "train.loss_chunk_tokens=40"]),
}  # fmt: skip


@pytest.fixture(scope="module")
def references(data_cache, tiny_data, tmp_path_factory):
    """Single-process runs of every family (4 blocks), made on first use."""
    cache = {}

    def get(family: str) -> dict:
        if family not in cache:
            cache[family] = make_reference(
                data_cache, tmp_path_factory, family, [*COMMON, *PP, *FAMILIES[family]], KEYS
            )
        return cache[family]

    return get


@pytest.fixture(scope="module")
def runs(data_cache, tiny_data, tmp_path_factory) -> dict:
    """Every pipeline layout's run dir, trained in one world per rank count."""
    layouts = {name: (n, [*PP, *FAMILIES[family], *extra]) for name, (family, n, extra) in LAYOUTS.items()}
    return launch_layouts(layouts, data_cache, tmp_path_factory.mktemp("pipeline"))


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_pipeline_layout_matches_single_process(name, references, runs):
    """Each step from the layout's own state, the trajectory and the final weights match single-process math."""
    family, layout_run = LAYOUTS[name][0], runs[name]
    assert_layout_matches(layout_run, references(family), KEYS)
    if family == "auxfree":  # every stage's selection biases, logged after each step: γ·sign steps, exactly equal
        bias = [[(r["step"], k, v) for r in read_metrics(run) for k, v in r.items() if "/bias/" in k]
                for run in (layout_run, references(family)["run_dir"])]  # fmt: skip
        assert bias[0] == bias[1] and len(bias[0]) == 6 * 4 * 4  # 6 steps × 4 MoE blocks × 4 experts


def test_resume_across_pipeline_layouts(references, data_cache, tmp_path):
    """Save at pp2 × dp2 after 3 steps; resume at pp4 and in one process (pp1): steps 4-6 match."""
    saved = tmp_path / "pp2dp2"
    launch(4, data_cache, saved, *PP, *FAMILIES["topk"], P2, "train.max_steps=3")
    as_pp4, as_pp1 = tmp_path / "pp4", tmp_path / "pp1"
    shutil.copytree(saved, as_pp4)
    shutil.copytree(saved, as_pp1)
    check(torchrun(4, "-m", "megamoe", "train", str(as_pp4), "--resume", "train.max_steps=6",
                   "parallel.pipeline_parallel=4"))  # fmt: skip
    check_trajectory(as_pp4, references("topk"), KEYS, from_step=3)
    cfg = tiny_config(data_cache, as_pp1, *COMMON, *PP, *FAMILIES["topk"], "train.max_steps=6")
    single_process_trainer(cfg, resume=True).fit()
    check_trajectory(as_pp1, references("topk"), KEYS, from_step=3)


def test_export_and_eval_from_a_pipeline_run(data_cache, tiny_data, tmp_path):
    """A pp2 run's checkpoint holds every stage's tensors once (the tied embedding from the first stage only):
    export, eval, analyze and generate read it."""
    import torch

    from megamoe.cli.main import main

    launch(2, data_cache, tmp_path / "run", *PP, *FAMILIES["tied"], *MOE, P2, "train.max_steps=3")
    model, _ = load_run_model(tmp_path / "run")
    exported = load_exported(export_run(tmp_path / "run", tmp_path / "export"))
    tokens = torch.randint(0, model.cfg.vocab_size, (2, model.cfg.seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(tokens).logits_BLV, model(tokens).logits_BLV, rtol=0, atol=0)
    assert main(["eval", str(tmp_path / "run"), "--max-sequences", "2"]) == 0
    assert main(["generate", str(tmp_path / "run"), "--prompt", "def", "--max-new-tokens", "4"]) == 0
    assert main(["analyze", str(tmp_path / "run"), "--max-sequences", "2"]) == 0
    assert (tmp_path / "run" / "analysis" / "report.md").is_file()
