"""The typed config tree: one dataclass per section, each field documented and checked.

The defaults are the tiny dense model that `megamoe train` (no arguments) trains on the embedded
corpus in a few minutes on 2 CPU cores. The data sections live in data_schema.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from megamoe.config.checks import _check, _nested, _non_negative, _positive
from megamoe.config.data_schema import DataConfig


@dataclass(kw_only=True)
class ModelConfig:
    """Shape of the decoder-only transformer."""

    d_model: int = 256
    """Width of the residual stream."""
    num_layers: int = 4
    """Number of transformer blocks."""
    num_heads: int = 4
    """Query heads; must divide d_model."""
    num_kv_heads: int = 0
    """Key/value heads for grouped-query attention; 0 = num_heads (multi-head attention)."""
    ffn_hidden_size: int = 0
    """Dense SwiGLU inner width; 0 = 8/3·d_model rounded up to a multiple of 64 (LLaMA rule)."""
    seq_len: int = 256
    """Tokens per training sequence (the context length)."""
    vocab_size: int = 0
    """Embedding rows; 0 = the tokenizer's vocabulary padded up to a multiple of vocab_multiple."""
    vocab_multiple: int = 64
    """Pad the vocabulary up to a multiple of this many rows."""
    rope_theta: float = 10000.0
    """Base of the rotary position embedding frequencies."""
    norm_eps: float = 1e-5
    """Epsilon of every RMSNorm."""
    tie_embeddings: bool = False
    """Share the input embedding matrix with the output (LM head) projection."""
    qkv_bias: bool = False
    """Add a learned bias to the query, key and value projections (Qwen2); it starts at zero."""
    init_std: float = 0.02
    """Std of the normal init of all weights; residual output projections use init_std/√(2·num_layers)."""
    init_from: str = ""
    """Start a new run from this run dir's newest checkpoint (or a checkpoints/step_N folder); dense → MoE upcycles."""

    @property
    def kv_heads(self) -> int:
        """Resolved number of key/value heads."""
        return self.num_kv_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.num_heads

    @property
    def ffn_hidden(self) -> int:
        """Resolved dense FFN inner width."""
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        return -(-8 * self.d_model // 3 // 64) * 64

    def validate(self) -> None:
        """Check the shape invariants."""
        _positive(self, "d_model", "num_layers", "num_heads", "seq_len", "vocab_multiple")
        _positive(self, "rope_theta", "norm_eps", "init_std")
        _non_negative(self, "num_kv_heads", "ffn_hidden_size", "vocab_size")
        _check(self.init_from == self.init_from.strip(), "init_from", f"has surrounding spaces: {self.init_from!r}")
        _check(
            self.d_model % self.num_heads == 0,
            "num_heads",
            f"must divide model.d_model ({self.d_model}), got {self.num_heads}",
        )
        _check(
            self.head_dim % 2 == 0,
            "num_heads",
            f"head width d_model/num_heads = {self.head_dim} must be even for rotary embeddings",
        )
        _check(
            self.num_heads % self.kv_heads == 0,
            "num_kv_heads",
            f"must divide model.num_heads ({self.num_heads}), got {self.num_kv_heads}",
        )


@dataclass(kw_only=True)
class MoEConfig:
    """Which blocks are mixtures of experts, and how tokens are routed to them."""

    routing: Literal["none", "topk", "expert_choice", "sparsemixer", "lory"] = "none"
    """Routing family: none = dense; topk; expert_choice; sparsemixer (GRIN); lory (segment-routed expert merging)."""
    scorer: Literal["linear", "gru"] = "linear"
    """Router logits from a linear layer, or RMoE's GRU carried from MoE layer to MoE layer."""
    num_experts: int = 8
    """Routed experts per MoE layer."""
    top_k: int = 2
    """Experts per token (token choice)."""
    moe_every: int = 1
    """Block i is a MoE block iff i mod moe_every == moe_every - 1 (1 = every block)."""
    residual: bool = False
    """OpenMoE residual MoE: a dense SwiGLU FFN (model.ffn_hidden_size) beside the experts in MoE blocks."""
    num_shared_experts: int = 0
    """Always-active experts of expert_hidden_size each, added to the routed output."""
    expert_hidden_size: int = 0
    """SwiGLU inner width of each expert; 0 = model.ffn_hidden_size."""
    score_fn: Literal["softmax", "sigmoid"] = "softmax"
    """Router score function over the expert logits."""
    renormalize: bool = False
    """Rescale the top-k weights to sum to 1 (GShard/Mixtral); false = raw scores (Switch/ST-MoE/OpenMoE)."""
    router_fp32: bool = True
    """Compute router logits and scores in fp32."""
    input_jitter_eps: float = 0.0
    """Multiply the router input by U(1 - eps, 1 + eps) in training (Switch); 0 = off."""
    jitter_eps: float = 0.01
    """SparseMixer-v2 relative threshold: expert i is sampled only if (z_max - z_i) / max(|z_i|, z_max) <= 2·eps."""
    omega_scales_expert_grad: bool = True
    """SparseMixer-v2: scale the expert gradient by omega like the forward (released code); false = Algorithm 1."""
    gru_hidden: int = 128
    """RMoE: GRU state width p (projector d -> p, router p -> E)."""
    gru_detach_state: bool = False
    """RMoE ablation: cut the gradient of the state passed between MoE layers (forward unchanged)."""
    gru_no_passing: bool = False
    """RMoE ablation: every MoE layer starts its GRU from the zero state."""
    gru_bias_init: float = 0.0
    """RMoE: start value of the shared GRU's bias_ih and bias_hh; 0 as released and Megatron, 1 = megamoe's old init."""
    capacity_factor: float = 0.0
    """Training capacity factor (token choice; 0 = dropless); for expert_choice, c = average experts per token."""
    eval_capacity_factor: float = 0.0
    """Capacity factor in evaluation and generation (token choice and the expert-choice fallback); 0 = dropless."""
    capacity_formula: Literal["k*cf*G/E", "cf*G/E"] = "k*cf*G/E"
    """Expert capacity C = max(min_capacity, ceil(formula)) over the G tokens a rank routes (megatron: k*cf*G/E)."""
    min_capacity: int = 4
    """Lower bound of the expert capacity C."""
    drop_policy: Literal["position", "probs"] = "position"
    """Who is dropped when an expert is full: position = later requests (first choices first); probs = lowest score."""
    pad_to_capacity: bool = False
    """Run every expert on exactly C slots (static shapes; padding is computed and discarded)."""
    eval_top_k: int = 0
    """Expert choice's causal fallback in eval/generation: token-choice top-k; 0 = round(capacity_factor)."""
    balance_loss_coef: float = 0.01
    """Switch balance loss coefficient alpha (token choice); 0 = off."""
    balance_loss_level: Literal["auto", "micro_batch", "sequence", "global"] = "auto"
    """Where f and P are measured (micro-batch, sequence, all DP ranks); auto: global for sparsemixer."""
    z_loss_coef: float = 0.001
    """Router z-loss coefficient (ST-MoE); 0 = off."""
    balance: Literal["aux_loss", "aux_free", "none"] = "aux_loss"
    """Load balancing (token choice): the balance loss; DeepSeek-V3's per-expert selection bias; or none."""
    bias_update_rate: float = 0.001
    """aux_free: after every optimizer step, b_i += rate · sign(mean load - load_i) over the global batch."""
    routed_scaling: float = 1.0
    """Token choice: multiply the routed experts' combine weights by this (DeepSeek-V3's routed scaling factor)."""
    num_groups: int = 1
    """Token choice: split the experts into this many contiguous groups (= EP size: one group per EP rank)."""
    topk_groups: int = 0
    """Group-limited routing: experts come from the top groups by the sum of top-(k/topk_groups) scores; 0 = all."""
    segment_length: int = 256
    """Lory: tokens per routing segment T (the last segment of a sequence may be shorter)."""
    routing_mode: Literal["causal_segment", "prefix"] = "causal_segment"
    """Lory: segment k routed by segment k-1's mean, or every segment by the first one (the paper's ablation)."""
    merge_impl: Literal["reference", "triton", "cpu", "auto"] = "auto"
    """Lory's expert merge: reference (torch ops), triton (CUDA kernels), cpu (fused C kernel), auto (fastest here)."""
    dense_warmup_fraction: float = -1.0
    """Train dense (all on expert 0) for this fraction of steps, then copy it to all experts; -1 = 0.05 lory else 0."""
    dense_warmup_steps: int = 0
    """Lory: the dense warm-up in steps instead of a fraction (the same at every train.max_steps); 0 = the fraction."""
    generate_routing: Literal["prompt", "segment"] = "prompt"
    """Lory in generation: route once per layer from the prompt mean, or re-route every segment."""
    upcycle_noise: float = 0.0
    """Upcycling a dense checkpoint: multiply each expert weight by 1 + upcycle_noise·N(0, 1); 0 = exact copies."""
    log_per_expert: bool = False
    """Also log tokens per expert for every expert and layer (many W&B keys); aggregates are always logged."""

    @property
    def enabled(self) -> bool:
        """The model has MoE blocks."""
        return self.routing != "none"

    @property
    def warmup_fraction(self) -> float:
        """dense_warmup_fraction resolved (0 when dense_warmup_steps sets the length)."""
        if self.dense_warmup_steps > 0:
            return 0.0
        if self.dense_warmup_fraction >= 0:
            return self.dense_warmup_fraction
        return 0.05 if self.routing == "lory" else 0.0

    @property
    def balance_level(self) -> str:
        """balance_loss_level resolved."""
        if self.balance_loss_level != "auto":
            return self.balance_loss_level
        return "global" if self.routing == "sparsemixer" else "micro_batch"

    @property
    def uses_balance_loss(self) -> bool:
        """The balance loss is on: balance aux_loss, or aux_free with an explicit level (V3's complementary loss)."""
        if self.balance_loss_coef <= 0 or self.balance == "none":
            return False
        return self.balance == "aux_loss" or self.balance_loss_level != "auto"

    def is_moe_layer(self, index: int) -> bool:
        """Block `index` (0-based) is a MoE block."""
        return self.enabled and index % self.moe_every == self.moe_every - 1

    def validate(self) -> None:
        """Check counts and the capacity settings."""
        _positive(self, "num_experts", "top_k", "moe_every", "min_capacity")
        _non_negative(self, "num_shared_experts", "expert_hidden_size", "input_jitter_eps", "jitter_eps", "eval_top_k")
        _positive(self, "gru_hidden")
        _check(math.isfinite(self.gru_bias_init), "gru_bias_init", f"must be a finite number, got {self.gru_bias_init}")
        _non_negative(self, "upcycle_noise")
        _non_negative(self, "capacity_factor", "eval_capacity_factor", "balance_loss_coef", "z_loss_coef")
        _check(
            self.routing == "lory" or self.top_k <= self.num_experts,
            "top_k",
            f"({self.top_k}) must be <= moe.num_experts ({self.num_experts})",
        )
        _check(self.input_jitter_eps < 1.0, "input_jitter_eps", f"must be < 1, got {self.input_jitter_eps}")
        if self.routing == "expert_choice":
            _check(self.capacity_factor > 0, "capacity_factor", "expert_choice needs c > 0 (average experts per token)")
            _check(self.score_fn == "softmax", "score_fn", "expert_choice uses softmax scores")
        _positive(self, "segment_length")
        _check(
            self.dense_warmup_fraction < 1.0, "dense_warmup_fraction", f"must be < 1, got {self.dense_warmup_fraction}"
        )
        _check(
            self.routing == "lory" or self.warmup_fraction == 0,
            "dense_warmup_fraction",
            "dense warm-up and upcycling are implemented for moe.routing=lory",
        )
        _non_negative(self, "dense_warmup_steps")
        _check(
            self.routing == "lory" or self.dense_warmup_steps == 0,
            "dense_warmup_steps",
            "dense warm-up and upcycling are implemented for moe.routing=lory",
        )
        if self.routing == "lory":
            _check(
                self.capacity_factor == 0, "capacity_factor", "lory merges every expert for every segment: no capacity"
            )
            _check(
                self.num_shared_experts == 0 and not self.residual,
                "num_shared_experts",
                "lory has no shared or residual FFN",
            )
        if self.routing == "sparsemixer":
            _check(self.capacity_factor == 0 and self.eval_capacity_factor == 0, "capacity_factor",
                   "sparsemixer is dropless: moe.capacity_factor and moe.eval_capacity_factor must be 0")  # fmt: skip
            _check(
                not self.renormalize,
                "renormalize",
                "sparsemixer weights are per-round probabilities, never renormalized",
            )
            _check(self.score_fn == "softmax", "score_fn", "sparsemixer samples from a (masked) softmax")
        self._validate_balance()
        if self.renormalize:
            _check(
                self.top_k > 1 or self.score_fn == "sigmoid",
                "renormalize",
                "a renormalized top-1 softmax weight is always 1",
            )

    def _validate_balance(self) -> None:
        """moe.balance and group-limited routing: token choice only, groups that divide the experts."""
        _non_negative(self, "bias_update_rate", "topk_groups")
        _positive(self, "routed_scaling", "num_groups")
        if self.balance == "aux_free":
            why = {"expert_choice": "balanced by construction", "lory": "soft weights over all experts",
                   "sparsemixer": "samples from the unbiased softmax"}.get(self.routing)  # fmt: skip
            _check(why is None, "balance", f"aux_free biases the top-k selection; moe.routing={self.routing} ({why})")
        _check(self.routed_scaling == 1.0 or self.routing == "topk", "routed_scaling",
               f"scales token-choice weights (moe.routing={self.routing})")  # fmt: skip
        grouped = self.num_groups > 1 or self.topk_groups > 0
        if not grouped:
            return
        _check(
            self.routing == "topk", "num_groups", f"group-limited routing is token choice (moe.routing={self.routing})"
        )
        _check(self.num_experts % self.num_groups == 0, "num_groups",
               f"({self.num_groups}) must divide moe.num_experts ({self.num_experts})")  # fmt: skip
        _check(self.topk_groups <= self.num_groups, "topk_groups",
               f"({self.topk_groups}) must be <= moe.num_groups ({self.num_groups})")  # fmt: skip
        kept = (self.topk_groups or self.num_groups) * (self.num_experts // self.num_groups)
        _check(kept >= self.top_k, "topk_groups",
               f"its groups hold {kept} experts, fewer than moe.top_k ({self.top_k})")  # fmt: skip


@dataclass(kw_only=True)
class ParallelConfig:
    """Parallel degrees (checked against the world size at launch) and the data-parallel engine."""

    tensor_parallel: int = 1
    """Tensor-parallel degree: attention heads, FFN width and vocabulary are split over this many ranks."""
    sequence_parallel: bool = False
    """Also split norms, residuals and dropout-free regions along the sequence over the TP ranks."""
    data_parallel: int = 0
    """Data-parallel degree; 0 = world_size / tensor_parallel."""
    expert_parallel: int = 1
    """Expert-parallel degree (whole experts placed on different ranks)."""
    expert_tensor_parallel: int = 1
    """Tensor-parallel degree inside each expert (its FFN width is split)."""
    zero_stage: Literal[0, 1, 2] = 1
    """DeepSpeed ZeRO stage over data parallel: 0 = all-reduce, 1 = shard optimizer state, 2 = also gradients."""
    pipeline_parallel: int = 1
    """Pipeline stages: the blocks are split over this many ranks (torch.distributed.pipelining)."""
    pipeline_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b"] = "1f1b"
    """Pipeline schedule: GPipe (all forwards, then all backwards), 1F1B, or interleaved 1F1B."""
    virtual_stages: int = 1
    """Model chunks per pipeline rank (interleaved_1f1b: > 1; others: 1)."""
    pipeline_split: str = ""
    """Blocks per pipeline chunk, comma-separated (e.g. '3,5'); '' = balanced, counting embedding and LM head."""
    timeout_s: int = 600
    """Collective timeout in seconds: a hung or failed rank makes the others fail after this long."""

    def validate(self) -> None:
        """Degrees are positive."""
        _positive(self, "tensor_parallel", "expert_parallel", "expert_tensor_parallel", "timeout_s")
        _positive(self, "pipeline_parallel", "virtual_stages")
        _check(
            self.virtual_stages == 1 or self.pipeline_schedule == "interleaved_1f1b",
            "virtual_stages",
            f"({self.virtual_stages}) > 1 needs parallel.pipeline_schedule=interleaved_1f1b",
        )
        _non_negative(self, "data_parallel")
        _check(
            not self.sequence_parallel or self.tensor_parallel > 1,
            "sequence_parallel",
            "needs parallel.tensor_parallel > 1 (sequences are split over the TP ranks)",
        )


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW with linear warm-up and a decay schedule."""

    lr: float = 3e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of optim.lr."""
    decay_style: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    """Learning-rate decay after warm-up; wsd = warmup-stable-decay (peak LR, then a linear cooldown)."""
    decay_fraction: float = 0.2
    """WSD: share of train.max_steps spent decaying at the end; the rest after warm-up is at the peak LR."""
    warmup_steps: int = 0
    """Linear warm-up steps; 0 = use optim.warmup_fraction."""
    warmup_fraction: float = 0.05
    """Warm-up as a fraction of train.max_steps (when optim.warmup_steps is 0)."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to matrices only (not norms)."""
    beta1: float = 0.9
    """AdamW first-moment decay."""
    beta2: float = 0.95
    """AdamW second-moment decay."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 = no clipping."""

    def warmup_length(self, max_steps: int) -> int:
        """Warm-up length in steps: optim.warmup_steps, else the fraction of the run."""
        return self.warmup_steps or int(self.warmup_fraction * max_steps)

    def decay_start(self, max_steps: int) -> int:
        """WSD: the 0-indexed step of the first decayed update, max_steps - round(decay_fraction · max_steps)."""
        return max_steps - round(self.decay_fraction * max_steps)

    def validate(self) -> None:
        """Check ranges."""
        _positive(self, "lr", "eps")
        _check(0.0 < self.decay_fraction <= 1.0, "decay_fraction", f"must be in (0, 1], got {self.decay_fraction}")
        _non_negative(self, "weight_decay", "grad_clip", "warmup_steps")
        _check(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        _check(0.0 <= self.warmup_fraction < 1.0, "warmup_fraction", f"must be in [0, 1), got {self.warmup_fraction}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            _check(0.0 <= value < 1.0, name, f"must be in [0, 1), got {value}")


@dataclass(kw_only=True)
class TrainConfig:
    """Length, batch shape, evaluation, checkpoints and numerics of one run."""

    max_steps: int = 270
    """Optimizer steps to train for."""
    micro_batch_size: int = 8
    """Sequences per forward/backward pass on one rank."""
    global_batch_size: int = 16
    """Sequences per optimizer step over all data-parallel ranks and accumulation steps."""
    eval_interval: int = 90
    """Evaluate on the validation split every this many steps (and at the end); 0 = only at the end."""
    eval_batches: int = 8
    """Validation micro-batches per evaluation."""
    checkpoint_interval: int = 90
    """Save a checkpoint every this many steps (and at the end); 0 = only at the end."""
    keep_checkpoints: int = 2
    """Keep the newest this many checkpoints; older ones are deleted."""
    checkpoint_steps: list[int] = field(default_factory=list)
    """Also save a checkpoint at each of these steps and keep it (never pruned by train.keep_checkpoints)."""
    max_nonfinite_steps: int = 0
    """Skip up to this many consecutive updates with a non-finite loss or gradient norm; 0 = stop at the first."""
    seed: int = 1234
    """Seed of model initialization and data sampling."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Compute precision: auto = bf16 autocast on CUDA, fp32 on CPU (bf16 without AMX/AVX512-BF16: 10–30× slower)."""
    pipeline_microbatches: int = 0
    """Pipeline micro-batches per step; 0 = global_batch_size / (micro_batch_size · data-parallel degree)."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recompute in backward: full = whole blocks; selective = attention core and expert SwiGLU."""
    loss_chunk_tokens: int = 0
    """> 0: the LM head fused with the cross-entropy, this many tokens at a time (no logits held); 0 = plain."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Device to train on; auto = CUDA when available."""
    run_dir: str = ""
    """Run directory; '' = runs/<train.name>-<date>-<time>."""
    name: str = ""
    """Run name; '' = the config file's stem, or 'default'."""

    def validate(self) -> None:
        """Check ranges and batch divisibility."""
        _positive(self, "max_steps", "micro_batch_size", "global_batch_size", "eval_batches", "keep_checkpoints")
        counts = ("eval_interval", "checkpoint_interval", "max_nonfinite_steps", "pipeline_microbatches")
        _non_negative(self, *counts, "loss_chunk_tokens")
        _check(
            self.global_batch_size % self.micro_batch_size == 0,
            "global_batch_size",
            f"must be a multiple of train.micro_batch_size ({self.micro_batch_size}), got {self.global_batch_size}",
        )
        bad = [step for step in self.checkpoint_steps if not 0 < step <= self.max_steps]
        _check(not bad, "checkpoint_steps", f"steps must be in [1, train.max_steps={self.max_steps}], got {bad}")


@dataclass(kw_only=True)
class WandbConfig:
    """Weights & Biases tracking."""

    mode: Literal["offline", "online", "disabled"] = "offline"
    """offline = write to <run_dir>/wandb only; online = sync to the server; disabled = off."""
    project: str = "megamoe"
    """W&B project name."""
    entity: str = ""
    """W&B entity (team); '' = the account default."""

    def validate(self) -> None:
        """Project is named."""
        _check(bool(self.project), "project", "must not be empty")


@dataclass(kw_only=True)
class LoggingConfig:
    """Where metrics go."""

    log_interval: int = 10
    """Log training metrics every this many steps."""
    progress: bool = True
    """Show a progress bar."""
    tensorboard: bool = False
    """Also write TensorBoard scalars to <run_dir>/tensorboard (needs the tensorboard package)."""
    peak_tflops: float = 0.0
    """Peak TFLOP/s per device for MFU; 0 = known GPU table, or a matmul measured at start on CPU."""
    router_health: bool = False
    """Log per-step router gradient norms and routing/GRU statistics to <run_dir>/router_health.jsonl (no TP/EP/PP)."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases settings."""

    def validate(self) -> None:
        """Check ranges."""
        _positive(self, "log_interval")
        _non_negative(self, "peak_tflops")
        _nested(self.wandb, "wandb")


@dataclass(kw_only=True)
class Config:
    """The whole run: one field per section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Transformer shape."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """Mixture-of-experts layout and routing."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel degrees."""
    data: DataConfig = field(default_factory=DataConfig)
    """Corpus and tokenization."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Run length, batches, checkpoints."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics sinks."""

    def validate(self) -> None:
        """Validate every section, then the invariants that span sections."""
        for name in ("model", "moe", "parallel", "data", "optim", "train", "logging"):
            _nested(getattr(self, name), name)
        self._validate_cross()

    def _validate_cross(self) -> None:
        """Invariants that involve two sections."""
        if self.moe.enabled:
            _check(
                self.moe.moe_every <= self.model.num_layers,
                "moe.moe_every",
                f"({self.moe.moe_every}) leaves no MoE block among model.num_layers ({self.model.num_layers})",
            )
        if self.optim.warmup_steps:
            _check(
                self.optim.warmup_steps < self.train.max_steps,
                "optim.warmup_steps",
                f"must be < train.max_steps ({self.train.max_steps}), got {self.optim.warmup_steps}",
            )
        if self.moe.dense_warmup_steps:
            _check(
                self.moe.dense_warmup_steps < self.train.max_steps,
                "moe.dense_warmup_steps",
                f"must be < train.max_steps ({self.train.max_steps}), got {self.moe.dense_warmup_steps}",
            )
        if self.optim.decay_style == "wsd":
            self._validate_wsd()
        if self.logging.router_health:
            self._validate_router_health()

    def _validate_router_health(self) -> None:
        """Router health measures whole gradients: single-process or pure data parallel only."""
        par = self.parallel
        degrees = {
            "tensor_parallel": par.tensor_parallel,
            "expert_parallel": par.expert_parallel,
            "expert_tensor_parallel": par.expert_tensor_parallel,
            "pipeline_parallel": par.pipeline_parallel,
        }
        sharded = [f"parallel.{key}={value}" for key, value in degrees.items() if value > 1]
        _check(not sharded, "logging.router_health",
               f"its gradient norms need whole parameters on every rank (single process or pure data "
               f"parallel), but {', '.join(sharded)} shards them; set those degrees to 1")  # fmt: skip

    def _validate_wsd(self) -> None:
        """WSD: at least one decayed update, and the warm-up over before the decay starts."""
        optim, steps = self.optim, self.train.max_steps
        start = optim.decay_start(steps)
        _check(start < steps, "optim.decay_fraction",
               f"wsd: round({optim.decay_fraction} · train.max_steps={steps}) is 0 decay steps; raise it")  # fmt: skip
        warm = optim.warmup_length(steps)
        _check(warm <= start, "optim.warmup_steps",
               f"wsd: the {warm} warm-up steps end after the decay starts at step {start} "
               f"(train.max_steps - round(optim.decay_fraction · train.max_steps))")  # fmt: skip
