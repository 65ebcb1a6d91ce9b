"""The per-rank memory plan (megamoe.parallel.memory) against what the real model allocates and saves.

Activations: the estimate of one micro-batch against the bytes autograd keeps in one CPU forward
(fp32), counted with `saved_tensors_hooks`: one entry per storage (views of one tensor, e.g. k and
v of the fused QKV output, count once, at the storage's size) and parameters and buffers left out.
The formulas name every tensor the forward saves, so the dropless cases agree to within bytes
(measured: ≤ 0.3%); the 15% budget covers what the formulas do not know in advance: with a capacity,
how many assignments are dropped (the plan counts the capacity bound, measured 5.5% over), and the
routing bookkeeping, counted for top-k, which differs slightly between routing families.
Model states: exact, against the real model, its gradients and torch AdamW's state.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megamoe.config import Config, ModelConfig, MoEConfig, ParallelConfig, TrainConfig, load_config
from megamoe.config.resolve import with_vocab
from megamoe.model import build_model
from megamoe.model.params import meta_counts
from megamoe.model.recompute import set_recompute
from megamoe.parallel import activations as act
from megamoe.parallel.layout import resolve_layout
from megamoe.parallel.memory import GIB, in_flight, parse_bytes, plan_memory
from megamoe.parallel.specs import ShardShapeFactory

REPO = Path(__file__).resolve().parents[2]
MODEL = ModelConfig(vocab_size=96, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, seq_len=24)
FAMILIES = {
    "dense": MoEConfig(),
    "top2": MoEConfig(routing="topk", num_experts=4),
    "top2-capacity": MoEConfig(routing="topk", num_experts=4, capacity_factor=1.0),
    "lory": MoEConfig(routing="lory", num_experts=4, segment_length=8, dense_warmup_fraction=0.0),
}
TOLERANCE = 0.15


def tiny(moe: MoEConfig, recompute: str = "none", **parallel) -> Config:
    """The tiny model, 4 sequences per micro-batch, fp32 on the CPU."""
    train = TrainConfig(micro_batch_size=4, global_batch_size=32, recompute=recompute, device="cpu")
    return Config(model=MODEL, moe=moe, train=train, parallel=ParallelConfig(**parallel))


def saved_bytes(model: torch.nn.Module, tokens_BL: torch.Tensor) -> int:
    """Bytes of the storages autograd keeps for backward in one forward (parameters and buffers excluded)."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens_BL[:, :-1], tokens_BL[:, 1:])
    return sum(storages.values())


def estimate(cfg: Config, deg: act.Degrees | None = None) -> int:
    """The plan's activation bytes of one micro-batch through the whole model (fp32)."""
    deg, dt, mode = deg or act.Degrees(), act.Dtypes(4, 4), cfg.train.recompute
    if mode == "full":
        blocks = cfg.model.num_layers * act.block_input(cfg, deg, dt)
    else:
        blocks = sum(act.block_bytes(cfg, i, deg, dt, mode) for i in range(cfg.model.num_layers))
    return blocks + act.embedding_bytes(cfg) + act.head_bytes(cfg, deg, dt)


@pytest.fixture
def tokens():
    """Four sequences of 25 token ids."""
    return torch.randint(0, MODEL.vocab_size // 2, (4, MODEL.seq_len + 1), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("mode", ["none", "selective", "full"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_activation_estimate_matches_autograd(family, mode, tokens):
    """One micro-batch's estimated activations are within 15% of what the CPU forward saves."""
    cfg = tiny(FAMILIES[family], mode)
    model = build_model(MODEL, 0, moe=cfg.moe).train()
    set_recompute(model, mode)
    measured = saved_bytes(model, tokens)
    assert estimate(cfg) == pytest.approx(measured, rel=TOLERANCE)


def test_fused_loss_estimate_matches_autograd(tokens):
    """train.loss_chunk_tokens: the head keeps no log-softmax (each token's log-sum-exp instead), as estimated."""
    cfg = tiny(FAMILIES["dense"])
    fused_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, loss_chunk_tokens=16))
    model = build_model(MODEL, 0).train()
    plain = saved_bytes(model, tokens)
    model.loss_chunk_tokens = 16
    fused = saved_bytes(model, tokens)
    assert estimate(fused_cfg) == pytest.approx(fused, rel=TOLERANCE)
    assert estimate(cfg) - estimate(fused_cfg) == pytest.approx(plain - fused, rel=TOLERANCE)


def test_tensor_parallel_shapes_shrink_as_estimated(tokens):
    """One TP rank's shapes (tp2, no communication: heads, F and vocabulary halved) against the estimate."""
    cfg = tiny(FAMILIES["dense"])
    model = build_model(MODEL, 0, ShardShapeFactory(2)).train()
    measured = saved_bytes(model, tokens)
    assert estimate(cfg, act.Degrees(tp=2)) == pytest.approx(measured, rel=TOLERANCE)


@pytest.mark.parametrize("family", ["dense", "top2", "lory"])
def test_single_process_model_states_are_exact(family, tokens):
    """Weights, gradients and AdamW's state (two moments and a step per tensor) equal the real ones."""
    from megamoe.train.optim import build_optimizer

    cfg = tiny(FAMILIES[family])
    stage = plan_memory(cfg, resolve_layout(cfg, 1)).worst
    model = build_model(MODEL, 0, moe=cfg.moe).train()
    optimizer = build_optimizer(model, cfg.optim)
    out = model(tokens[:, :-1], tokens[:, 1:])
    (out.loss + out.aux_loss).backward()
    optimizer.step()
    params = list(model.parameters())
    assert stage.weights == sum(p.numel() * p.element_size() for p in params)
    assert stage.grads == sum(p.grad.numel() * p.grad.element_size() for p in params)
    state = [t for s in optimizer.state.values() for t in s.values()]
    assert stage.optimizer == sum(t.numel() * t.element_size() for t in state)


def test_per_rank_states_follow_the_shard_shapes():
    """tp2 × ep4 on 8 ranks (DeepSpeed, fp32, ZeRO-1): parameters are ShardShapeFactory's, the optimizer
    state (two moments and the fp32 master copy) is partitioned over DP for dense and expert-DP for experts."""
    cfg = tiny(FAMILIES["top2"], tensor_parallel=2, expert_parallel=4, zero_stage=1)
    layout = resolve_layout(cfg, 8)
    stage = plan_memory(cfg, layout).worst
    shards = build_model(MODEL, 0, ShardShapeFactory(2, ep_size=4), cfg.moe)
    experts = sum(p.numel() for p in shards.parameters() if getattr(p, "expert", False))
    total = meta_counts(MODEL, ShardShapeFactory(2, ep_size=4), cfg.moe).total
    assert (stage.params, stage.expert_params) == (total, experts)
    assert (layout.dp, layout.edp) == (4, 2)
    assert stage.weights == stage.grads == 4 * total
    assert stage.optimizer == 12 * (total - experts) // 4 + 12 * experts // 2


def test_pipeline_stages_hold_their_blocks():
    """pp2: the stages' parameters add up to the model's, plus the last stage's copy of a tied embedding."""
    model = ModelConfig(vocab_size=96, d_model=32, num_layers=4, num_heads=4, tie_embeddings=True, seq_len=24)
    cfg = Config(model=model, train=TrainConfig(micro_batch_size=2, global_batch_size=8, device="cpu"),
                 parallel=ParallelConfig(pipeline_parallel=2, zero_stage=0))  # fmt: skip
    plan = plan_memory(cfg, resolve_layout(cfg, 2))
    assert sum(s.params for s in plan.stages) == meta_counts(model).total + 96 * 32
    assert [s.in_flight for s in plan.stages] == [2, 1]  # 1F1B: p − stage micro-batches


@pytest.mark.parametrize(("pp", "vpp", "m"), [(4, 2, 8), (4, 2, 4), (2, 3, 6), (8, 2, 16)])
def test_interleaved_in_flight_follows_torch(pp, vpp, m):
    """Interleaved 1F1B: warm-up forwards + 1 per rank, as torch's schedule computes its warm-up."""
    from torch.distributed.pipelining.schedules import _get_warmup_ops

    cfg = tiny(FAMILIES["dense"], pipeline_parallel=pp, virtual_stages=vpp, pipeline_schedule="interleaved_1f1b")
    layout = type("L", (), {"pp": pp, "vpp": vpp, "micro_batches": m})()
    for rank in range(pp):
        units = min(_get_warmup_ops(rank, vpp, pp, pp, m) + 1, m * vpp)
        assert sum(in_flight(cfg, layout, rank)) == units
    assert sum(in_flight(cfg, layout, 0)) / vpp == pytest.approx(min(pp + (pp - 1) / vpp, m), abs=1 / vpp)


def test_parse_bytes():
    """Decimal and binary units; anything else is a one-line error."""
    assert parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("141GiB") == 141 * GIB
    assert parse_bytes("512 MB") == 512 * 10**6
    from megamoe.errors import MegamoeError

    for bad in ("80XB", "GB", "-1GB", "0GB"):
        with pytest.raises(MegamoeError, match="--device-memory"):
            parse_bytes(bad)


def cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m megamoe ...` as a user runs it."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "megamoe", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def test_cli_dry_run_memory_plan():
    """--dry-run --world-size 8 --device-memory 80GB prints the plan and the verdict; a bad size is one line."""
    res = cli("train", "configs/debug/cpu_tiny.yaml", "train.global_batch_size=64", "--dry-run", "--world-size", "8",
              "--device-memory", "80GB")  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "# memory per rank (deepspeed engine" in res.stdout
    assert "#   stage 0: " in res.stdout and "# worst rank: stage 0" in res.stdout
    assert "# device memory 74.51 GiB: fits (margin " in res.stdout
    bad = cli("train", "configs/debug/cpu_tiny.yaml", "--dry-run", "--device-memory", "80XB")
    assert bad.returncode == 2
    assert bad.stderr.strip() == "megamoe: error: --device-memory: '80XB' is not a size such as 80GB, 141GiB or 512MB"


def test_grin_pipeline_recipe_fits_64_gpus():
    """configs/paper/grin_16x3.8b_pp.yaml: pp16 × dp4 on 64 ranks, full recompute, no EP, ZeRO 0; fits 80 GB."""
    cfg = load_config(REPO / "configs/paper/grin_16x3.8b_pp.yaml")
    cfg = with_vocab(cfg, cfg.model.vocab_size, "config")
    layout = resolve_layout(cfg, 64)
    assert layout.describe() == "pp16-tp1-dp4"
    assert (layout.ep, cfg.parallel.zero_stage, cfg.train.recompute) == (1, 0, "full")
    plan = plan_memory(cfg, layout)
    assert plan.engine == "pipeline" and plan.bf16 and len(plan.stages) == 16
    assert plan.worst.total < 80 * 10**9
    import torch

    from megamoe.model import Transformer
    from megamoe.parallel.pipeline import stage_part

    with torch.device("meta"):  # what pipeline rank 0 builds at start-up: its stage only
        stage0 = Transformer(cfg.model, moe=cfg.moe, part=stage_part(cfg, 0, 16))
    assert sum(p.numel() for p in stage0.parameters()) == plan.stages[0].params
