"""Activation bytes of one micro-batch on one rank: the tensors autograd keeps for backward, block by block.

Shape legend: L sequence, B micro-batch, T = L·B tokens, D width, H query heads, G key/value
heads, K head width, F FFN width, V vocabulary, E experts, k top-k, A kept expert assignments.
Each term names the tensor the forward saves (counted from `saved_tensors_hooks` on CPU; the
tests check the sum within 15%). Bytes: `a` for matmul inputs and outputs (4 in fp32, 2 in bf16),
`r` for the residual stream (fp32 under autocast, bf16 under DeepSpeed's bf16 weights); norm
internals, the router, softmax statistics and the expert combine are fp32 in every mode.

Per rank under tensor parallelism (TP = t): heads and F are split by t; norms keep the whole
sequence unless sequence parallelism splits it (T/t); column-parallel inputs are whole (gathered
under SP); a token-choice MoE block routes T/t tokens; Lory gives each TP rank B/t whole sequences
and gathers the segments of its EP peers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megamoe.config import Config
from megamoe.model.moe.routing import capacity


@dataclass(frozen=True)
class Dtypes:
    """Bytes per element of matmul activations (a) and of the residual stream (r)."""

    a: int = 4
    r: int = 4


@dataclass(frozen=True)
class Degrees:
    """The parallel degrees that shrink activations."""

    tp: int = 1
    sp: bool = False
    ep: int = 1
    etp: int = 1


def norm_bytes(tokens: int, dim: int) -> int:
    """RMSNorm in fp32: its fp32 input, the normalized x (T·D each) and 1/rms (T)."""
    return tokens * (8 * dim + 4)


def attention_core(cfg: Config, deg: Degrees, dt: Dtypes, selective: bool) -> int:
    """qkv output (k, v are views of it), rotated q and k, the SDPA output and its fp32 log-sum-exp."""
    m, t = cfg.model, cfg.train.micro_batch_size * cfg.model.seq_len
    heads, groups = m.num_heads // deg.tp, m.kv_heads // deg.tp
    qkv = dt.a * t * m.head_dim * (heads + 2 * groups)
    rotated = dt.a * t * m.head_dim * (heads + groups)
    out = dt.a * t * m.head_dim * heads  # also the output projection's input (a view)
    lse = 0 if selective else 4 * t * heads  # selective: recomputed with the core
    return qkv + rotated + out + lse


def attention_part(cfg: Config, deg: Degrees, dt: Dtypes, recompute: str) -> int:
    """attn_norm + the QKV projection's input + the attention core."""
    t = cfg.train.micro_batch_size * cfg.model.seq_len
    norm_tokens = t // deg.tp if deg.sp else t
    return (
        norm_bytes(norm_tokens, cfg.model.d_model)
        + dt.a * t * cfg.model.d_model
        + attention_core(cfg, deg, dt, recompute == "selective")
    )


def swiglu(rows: int, hidden: int, dt: Dtypes) -> int:
    """gate and up outputs, SiLU(gate) and the product (the down projection's input)."""
    return 4 * dt.a * rows * hidden


def dense_ffn(cfg: Config, deg: Degrees, dt: Dtypes) -> int:
    """ffn_norm + the gate/up input + the SwiGLU intermediates (F split over TP)."""
    t, m = cfg.train.micro_batch_size * cfg.model.seq_len, cfg.model
    norm_tokens = t // deg.tp if deg.sp else t
    return norm_bytes(norm_tokens, m.d_model) + dt.a * t * m.d_model + swiglu(t, m.ffn_hidden // deg.tp, dt)


def kept_assignments(cfg: Config, tokens: int) -> int:
    """Expert assignments one rank keeps: k·T dropless, at most E·C with a capacity (expert choice: E·C)."""
    moe = cfg.moe
    if moe.routing == "expert_choice":
        return moe.num_experts * capacity(tokens, moe, moe.capacity_factor, 1)
    if moe.capacity_factor > 0:
        return min(moe.top_k * tokens, moe.num_experts * capacity(tokens, moe, moe.capacity_factor, moe.top_k))
    return moe.top_k * tokens


def expert_rows(cfg: Config, deg: Degrees, tokens: int) -> int:
    """Rows the grouped experts compute on: the kept assignments (balanced over EP), gathered over expert-TP,
    padded to E·C with moe.pad_to_capacity."""
    moe = cfg.moe
    if moe.pad_to_capacity and moe.capacity_factor > 0 and moe.routing == "topk":
        return moe.num_experts * capacity(tokens, moe, moe.capacity_factor, moe.top_k) * deg.etp
    return kept_assignments(cfg, tokens) * deg.etp


def token_choice_ffn(cfg: Config, deg: Degrees, dt: Dtypes, recompute: str) -> int:
    """ffn_norm, the fp32 router input and bookkeeping, expert rows and SwiGLU, the fp32 combine; extra FFNs."""
    m, moe = cfg.model, cfg.moe
    t = cfg.train.micro_batch_size * m.seq_len
    routed = t // deg.tp
    kept, rows = kept_assignments(cfg, routed), expert_rows(cfg, deg, routed)
    hidden = moe.expert_hidden_size or m.ffn_hidden
    bookkeeping = 12 * routed * moe.num_experts + 29 * kept + 4 * routed  # logits/probs, indices, weights
    experts = dt.a * rows * m.d_model
    if recompute != "selective":
        experts += swiglu(rows, hidden // deg.etp, dt)
    combine = 8 * kept * m.d_model + 4 * kept  # fp32 expert outputs and weighted rows, weights
    extra = hidden * moe.num_shared_experts + (m.ffn_hidden if moe.residual else 0)
    norm_tokens = t // deg.tp if deg.sp else t
    return (
        norm_bytes(norm_tokens, m.d_model)
        + 4 * routed * m.d_model
        + bookkeeping
        + experts
        + combine
        + (swiglu(t, extra // deg.tp, dt) if extra else 0)
    )


def lory_sizes(cfg: Config, deg: Degrees) -> tuple[int, int, int]:
    """(tokens, segments, F slice) one rank merges for: B/tp sequences, gathered over the EP F-slice peers."""
    m, moe = cfg.model, cfg.moe
    seqs = cfg.train.micro_batch_size // deg.tp * deg.ep
    seg = min(moe.segment_length, m.seq_len)
    per_seq = math.ceil(m.seq_len / seg)
    return per_seq * seg * seqs, per_seq * seqs, (moe.expert_hidden_size or m.ffn_hidden) // deg.ep


def lory_ffn(cfg: Config, deg: Degrees, dt: Dtypes, recompute: str) -> int:
    """ffn_norm, segment means and routing weights, the merged SwiGLU's input and gate/up pre-activations."""
    m, moe = cfg.model, cfg.moe
    t = cfg.train.micro_batch_size * m.seq_len
    tokens, segments, hidden = lory_sizes(cfg, deg)
    routing = 4 * segments * m.d_model + 8 * segments * moe.num_experts
    merged = dt.r * tokens * m.d_model + (0 if recompute == "selective" else 2 * dt.a * tokens * hidden)
    norm_tokens = t // deg.tp if deg.sp else t
    return norm_bytes(norm_tokens, m.d_model) + routing + merged


def block_bytes(cfg: Config, index: int, deg: Degrees, dt: Dtypes, recompute: str) -> int:
    """Saved bytes of block `index` without full recompute."""
    attn = attention_part(cfg, deg, dt, recompute)
    if not cfg.moe.is_moe_layer(index):
        return attn + dense_ffn(cfg, deg, dt)
    if cfg.moe.routing == "lory":
        return attn + lory_ffn(cfg, deg, dt, recompute)
    return attn + token_choice_ffn(cfg, deg, dt, recompute)


def block_input(cfg: Config, deg: Degrees, dt: Dtypes) -> int:
    """Full recompute: a block keeps only its input (the residual stream, split under SP)."""
    t = cfg.train.micro_batch_size * cfg.model.seq_len
    return dt.r * (t // deg.tp if deg.sp else t) * cfg.model.d_model


def embedding_bytes(cfg: Config) -> int:
    """The token ids (int64) the embedding lookup keeps."""
    return 8 * cfg.train.micro_batch_size * cfg.model.seq_len


def head_bytes(cfg: Config, deg: Degrees, dt: Dtypes) -> int:
    """Final norm, the head's input, the targets, and the fp32 log-softmax of the (vocab-parallel) logits
    (fused with the loss, train.loss_chunk_tokens: each token's fp32 log-sum-exp instead)."""
    t, m = cfg.train.micro_batch_size * cfg.model.seq_len, cfg.model
    norm_tokens = t // deg.tp if deg.sp else t
    per_token = 4 if cfg.train.loss_chunk_tokens > 0 else 4 * (m.vocab_size // deg.tp)
    return norm_bytes(norm_tokens, m.d_model) + dt.a * t * m.d_model + per_token * t + 8 * t


def logits_bytes(cfg: Config, deg: Degrees, dt: Dtypes) -> int:
    """The head's output logits: not saved by autograd, but alive until the loss's backward (last stage);
    fused with the loss, one chunk's fp32 logits and their gradient, transient."""
    t, vocab = cfg.train.micro_batch_size * cfg.model.seq_len, cfg.model.vocab_size // deg.tp
    if cfg.train.loss_chunk_tokens > 0:
        return 2 * 4 * min(cfg.train.loss_chunk_tokens, t) * vocab
    return dt.a * t * vocab
