"""The per-rank memory plan of a layout: model states, activations and transient buffers, per pipeline stage.

Model states per parameter (P on this rank; n = its data-parallel degree: DP, or expert-DP for experts):

| engine | weights | gradients | optimizer |
|---|---|---|---|
| single process / pipeline (own AdamW) | 4 (+2 bf16 autocast copy) | 4 | 8 (+4 per tensor: step) |
| DeepSpeed fp32, ZeRO 0 / 1 / 2 | 4 | 4 / 4 / 4/n | 8 / 12/n / 12/n |
| DeepSpeed bf16, ZeRO 0 (its BF16_Optimizer) / 1 / 2 | 2 | 6 / 2 + 4/n / 6/n | 12/n |

(ZeRO keeps an fp32 master partition besides the two fp32 moments; bf16 adds fp32 gradient buffers.)
Activations: `activations.py` per micro-batch, times the micro-batches a stage holds at once.
Transients (one layer at a time): a block's recompute, Lory's reference merge buffer, the expert
all-to-all buffers, ZeRO-2's gradient bucket.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from megamoe.config import Config
from megamoe.errors import MegamoeError
from megamoe.parallel import activations as act
from megamoe.parallel.layout import Layout
from megamoe.parallel.stages import chunks_of_rank, split_layers

GIB = 2**30
ZERO2_BUCKET = 500_000_000
"""DeepSpeed's default reduce_bucket_size (elements): ZeRO-2's contiguous gradient bucket."""


@dataclass(frozen=True)
class StageMemory:
    """Bytes on one rank of one pipeline stage (all ranks of a stage hold the same shapes)."""

    stage: int
    params: int
    expert_params: int
    weights: int
    grads: int
    optimizer: int
    per_micro_batch: int
    in_flight: float
    recompute: int
    lory_merge: int
    comm: int

    @property
    def activations(self) -> int:
        """Activations of every micro-batch this stage holds at its peak."""
        return round(self.per_micro_batch * self.in_flight)

    @property
    def total(self) -> int:
        """Everything counted, transients included."""
        states = self.weights + self.grads + self.optimizer
        return states + self.activations + self.recompute + self.lory_merge + self.comm


@dataclass(frozen=True)
class MemoryPlan:
    """The plan of one layout: every pipeline stage, and how the run's numbers were read."""

    stages: list[StageMemory]
    engine: str
    bf16: bool
    recompute: str
    schedule: str

    @property
    def worst(self) -> StageMemory:
        """The stage whose ranks need the most memory."""
        return max(self.stages, key=lambda s: s.total)


def engine_of(layout: Layout) -> str:
    """Which optimizer side trains this layout: plain (one process), pipeline, or deepspeed."""
    if layout.world == 1:
        return "plain"
    return "pipeline" if layout.pp > 1 else "deepspeed"


def uses_bf16(cfg: Config) -> bool:
    """train.precision for the plan: bf16, or auto on anything but train.device=cpu (a GPU is planned for)."""
    return cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and cfg.train.device != "cpu")


def state_bytes(engine: str, bf16: bool, zero: int) -> tuple[tuple[float, float], ...]:
    """(full, partitioned) bytes per parameter of weights, gradients and optimizer state (the table above)."""
    if engine != "deepspeed":
        return (4.0 + 2 * bf16, 0.0), (4.0, 0.0), (8.0, 0.0)
    if not bf16:
        grads = (0.0, 4.0) if zero == 2 else (4.0, 0.0)
        return (4.0, 0.0), grads, ((0.0, 12.0) if zero else (8.0, 0.0))
    grads = {0: (6.0, 0.0), 1: (2.0, 4.0), 2: (0.0, 6.0)}[zero]
    return (2.0, 0.0), grads, (0.0, 12.0)


def stage_params(cfg: Config, layout: Layout) -> list[tuple[int, int, int]]:
    """Per pipeline rank: (parameters, expert parameters, parameter tensors) of one of its ranks."""
    import torch

    from megamoe.model.transformer import Transformer
    from megamoe.parallel.specs import ShardShapeFactory

    factory = ShardShapeFactory(layout.tp, ep_size=layout.ep, etp_size=layout.etp)
    with torch.device("meta"):
        model = Transformer(cfg.model, factory, cfg.moe)
    bounds = split_layers(cfg, layout.pp * layout.vpp) if layout.pp > 1 else [(0, cfg.model.num_layers)]
    out = []
    for rank in range(layout.pp):
        mine = chunks_of_rank(rank, layout.pp, layout.vpp) if layout.pp > 1 else [0]
        first, last = 0 in mine, len(bounds) - 1 in mine
        modules = [model.layers[i] for c in mine for i in range(*bounds[c])]
        modules += [model.embed] if first or (last and cfg.model.tie_embeddings) else []
        modules += [model.norm, model.lm_head] if last else []
        modules += [model.router_gru] if model.router_gru is not None else []
        params = [p for m in modules for p in m.parameters()]
        experts = sum(p.numel() for p in params if getattr(p, "expert", False))
        out.append((sum(p.numel() for p in params), experts, len(params)))
    return out


def in_flight(cfg: Config, layout: Layout, rank: int) -> list[int]:
    """Micro-batches whose activations each of this pipeline rank's chunks holds at the schedule's peak.

    GPipe: all m. 1F1B: p − rank (torch's warm-up p − 1 − rank forwards, then one more before the
    first backward). Interleaved 1F1B (torch's _get_warmup_ops): (v − 1)·p + 2·(p − 1 − rank) warm-up
    forwards plus one, capped at m·v, taken round-robin p at a time over the v chunks.
    """
    p, m, v = layout.pp, layout.micro_batches, layout.vpp
    if p == 1:
        return [1]
    schedule = cfg.parallel.pipeline_schedule
    if schedule == "gpipe":
        return [m] * v
    if schedule == "1f1b" and v == 1:
        return [min(p - rank, m)]
    units = min((v - 1) * p + 2 * (p - 1 - rank) + 1, m * v)
    counts = [0] * v
    for unit in range(units):
        counts[(unit // p) % v] += 1
    return counts


def _dtypes(cfg: Config, engine: str) -> act.Dtypes:
    """Activation bytes: fp32; bf16 autocast (fp32 residual); DeepSpeed's bf16 weights (bf16 residual)."""
    if not uses_bf16(cfg):
        return act.Dtypes(4, 4)
    return act.Dtypes(2, 2 if engine == "deepspeed" else 4)


def chunk_activations(cfg: Config, blocks: range, first: bool, last: bool, deg, dt) -> tuple[int, int]:
    """(saved bytes of one micro-batch through these blocks, the largest one-block recompute transient)."""
    mode = cfg.train.recompute
    full = [act.block_bytes(cfg, i, deg, dt, "none") for i in blocks]
    if mode == "full":
        saved = len(blocks) * act.block_input(cfg, deg, dt)
        transient = max(full, default=0)
    else:
        kept = [act.block_bytes(cfg, i, deg, dt, mode) for i in blocks]
        saved, transient = sum(kept), max((f - k for f, k in zip(full, kept)), default=0)
    saved += act.embedding_bytes(cfg) if first else 0
    saved += act.head_bytes(cfg, deg, dt) + act.logits_bytes(cfg, deg, dt) if last else 0
    return saved, transient


def lory_merge_bytes(cfg: Config, layout: Layout, dt: act.Dtypes) -> int:
    """Merge workspace of one Lory layer: the fused CPU kernel's (megamoe.ops.lory_cpu.workspace_bytes) where it
    runs; for the reference merge, merged weights of a segment chunk (twice in backward, with their gradients)
    and fp32 expert-gradient accumulators; none for the Triton merge."""
    from megamoe.ops import lory_cpu
    from megamoe.ops.lory import MERGE_CHUNK_BYTES

    moe, m = cfg.moe, cfg.model
    gpu = uses_bf16(cfg) or cfg.train.device == "cuda"
    if moe.routing != "lory" or moe.merge_impl == "triton" or (moe.merge_impl == "auto" and gpu):
        return 0
    tokens, segments, hidden = act.lory_sizes(cfg, act.Degrees(layout.tp, layout.sp, layout.ep))
    if moe.merge_impl in ("cpu", "auto"):
        fused = lory_cpu.workspace_bytes(segments, tokens // segments, m.d_model, hidden, moe.num_experts, dt.a)
        if fused is not None:
            return fused
    per_segment = 3 * m.d_model * hidden * dt.a
    budget = MERGE_CHUNK_BYTES["cuda" if gpu else "cpu"]
    chunk = min(max(1, budget // per_segment), segments)
    return 2 * chunk * per_segment + 4 * 3 * moe.num_experts * m.d_model * hidden


def comm_bytes(cfg: Config, layout: Layout, dt: act.Dtypes, params: int, engine: str) -> int:
    """Expert all-to-all send + receive rows (EP > 1), Lory's gathered segments' output, ZeRO-2's bucket."""
    bucket = 0
    if engine == "deepspeed" and cfg.parallel.zero_stage == 2:
        bucket = min(ZERO2_BUCKET, params) * (2 if uses_bf16(cfg) else 4)
    moe, d = cfg.moe, cfg.model.d_model
    if not moe.enabled or layout.ep * layout.etp == 1:
        return bucket
    if moe.routing == "lory":
        tokens, _, _ = act.lory_sizes(cfg, act.Degrees(layout.tp, layout.sp, layout.ep))
        return bucket + dt.a * tokens * d
    routed = cfg.train.micro_batch_size * cfg.model.seq_len // layout.tp
    return bucket + 2 * dt.a * act.kept_assignments(cfg, routed) * d


def plan_memory(cfg: Config, layout: Layout) -> MemoryPlan:
    """The memory plan of cfg at this layout (cfg.model.vocab_size resolved)."""
    engine = engine_of(layout)
    bf16, dt = uses_bf16(cfg), _dtypes(cfg, engine)
    deg = act.Degrees(layout.tp, layout.sp, layout.ep, layout.etp)
    bounds = split_layers(cfg, layout.pp * layout.vpp) if layout.pp > 1 else [(0, cfg.model.num_layers)]
    stages = []
    for rank, (params, experts, tensors) in enumerate(stage_params(cfg, layout)):
        mine = chunks_of_rank(rank, layout.pp, layout.vpp) if layout.pp > 1 else [0]
        chunks = [chunk_activations(cfg, range(*bounds[c]), c == 0, c == len(bounds) - 1, deg, dt) for c in mine]
        counts = in_flight(cfg, layout, rank)
        per_mb = sum(saved for saved, _ in chunks)
        held = sum(saved * n for (saved, _), n in zip(chunks, counts))
        w, g, o = (_state(params, experts, layout, full, part) for full, part in state_bytes(
            engine, bf16, cfg.parallel.zero_stage))  # fmt: skip
        o += 4 * tensors if engine != "deepspeed" else 0  # torch AdamW's fp32 step per tensor
        stages.append(StageMemory(
            rank, params, experts, w, g, o, per_mb, held / per_mb if per_mb else 0.0,
            max(t for _, t in chunks), lory_merge_bytes(cfg, layout, dt), comm_bytes(cfg, layout, dt, params, engine),
        ))  # fmt: skip
    return MemoryPlan(stages, engine, bf16, cfg.train.recompute, cfg.parallel.pipeline_schedule)


def _state(params: int, experts: int, layout: Layout, full: float, part: float) -> int:
    """Bytes of one model state: `full` per parameter, plus `part` partitioned over DP (experts: expert-DP)."""
    return round(full * params + part * ((params - experts) / layout.dp + experts / layout.edp))


_UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2**10, "MIB": 2**20, "GIB": GIB,
          "TIB": 2**40}  # fmt: skip


def parse_bytes(text: str) -> int:
    """'80GB' → 80·10⁹, '141GiB' → 141·2³⁰, '512MB'; a one-line MegamoeError otherwise."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise MegamoeError(f"--device-memory: {text!r} is not a size such as 80GB, 141GiB or 512MB")
    return int(float(match.group(1)) * _UNITS[unit])


def _gib(n: float) -> str:
    """Bytes as GiB with two decimals (MiB below 1 GiB)."""
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB else f"{n / 2**20:.2f} MiB"


def format_plan(plan: MemoryPlan, device_memory: int | None = None) -> list[str]:
    """The dry run's memory lines: one per stage, the worst rank, and fits / does not fit."""
    lines = [
        f"# memory per rank ({plan.engine} engine, {'bf16' if plan.bf16 else 'fp32'}, recompute {plan.recompute}"
        + (f", {plan.schedule}" if len(plan.stages) > 1 else "")
        + "): weights | grads | optimizer | activations (per micro-batch × in flight) | recompute | lory merge | comm"
    ]
    for s in plan.stages:
        lines.append(
            f"#   stage {s.stage}: {s.params:,} params -> {_gib(s.weights)} | {_gib(s.grads)} | {_gib(s.optimizer)} | "
            f"{_gib(s.activations)} ({_gib(s.per_micro_batch)} × {s.in_flight:.3g}) | {_gib(s.recompute)} | "
            f"{_gib(s.lory_merge)} | {_gib(s.comm)} = {_gib(s.total)}"
        )
    worst = plan.worst
    lines.append(f"# worst rank: stage {worst.stage}, {_gib(worst.total)}")
    if device_memory is not None:
        margin = device_memory - worst.total
        lines.append(
            f"# device memory {_gib(device_memory)}: {_verdict(margin)} (margin {_gib(margin)}; "
            "CUDA context, NCCL buffers and allocator fragmentation not counted)"
        )
    return lines


def _verdict(margin: float) -> str:
    """fits / does not fit."""
    return "fits" if margin >= 0 else "does not fit"
