"""Lory's merged SwiGLU: each segment's tokens through an FFN whose weights are the segment's
routing-weighted average of the experts' weights (parameter space, not output mixing).

Shape legend: S segments, C segments in one chunk, T tokens per segment, D width, F FFN width
(this rank's slice under expert-wise model parallelism), E experts.
  W̄_s = Σ_e w[s, e] · W_e   for W ∈ {gate, up, down};   y_s = W̄_down,s (SiLU(W̄_gate,s x) ⊙ W̄_up,s x)

`reference` is a custom autograd function. Segments are processed in chunks. Per chunk, each
matrix is merged with one GEMM over the expert axis into a reused buffer, laid out so the token
bmm's need no transposed operand; backward folds the chunk's merged-weight gradients onto the
experts with one in-place GEMM per matrix (docs/kernels.md, "The reference path on CPU").
Backward keeps only what a dense SwiGLU keeps (x and the gate/up pre-activations). It re-merges
the chunk's weights — E/T of the FFN FLOPs — instead of storing merged copies, which would be
3·F·D per segment and far larger than the activations. The merge and the weight gradients
accumulate in (at least) fp32; the matmuls run in the autocast dtype. `triton` (kernels/lory.py
through megamoe.ops.lory_triton) merges weight tiles in registers and never writes merged weights;
`cpu` (megamoe.ops.lory_cpu) fuses the same steps in C on CPU tiles: merged weights and their gradients never
exist whole. `auto` picks Triton on CUDA when the kernels import, `cpu` on a CPU when it builds, else the reference;
`megamoe.ops.lory_check` self-checks the fused kernels before they serve a device, dtype and shape class.
`megamoe.ops.reference.merged_swiglu_loop` is the slow oracle.
"""

from __future__ import annotations

import logging
import math
import os

import torch

from megamoe.errors import ConfigError
from megamoe.ops import lory_cpu

log = logging.getLogger(__name__)

MERGE_CHUNK_BYTES = {"cpu": 20 * 2**20, "cuda": 256 * 2**20}
"""Merged weights of one chunk (alive at once; twice that with their gradients in backward); chunks are
then evened out. CPU (Intel, 1 thread, E = 8, F·D = 704·256, fwd+bwd): 8–11 segments per chunk are
fastest at T = 64 and T = 256; 16 costs 10–20% more, 1 about 2× (docs/kernels.md)."""


INNER_BLOCKS = 256
"""The K = F·D inner products of the routing-weight gradient run as a bmm over gcd(K, 256) blocks of K."""


def _chunks(segments: int, per_segment_bytes: int, chunk_segments: int | None, device: str) -> list[slice]:
    """Segment ranges processed together (bounded merged-weight memory)."""
    budget = MERGE_CHUNK_BYTES.get(device, MERGE_CHUNK_BYTES["cuda"])
    size = chunk_segments or _even(segments, max(1, budget // per_segment_bytes))
    return [slice(s, min(s + size, segments)) for s in range(0, segments, size)]


def _even(total: int, most: int) -> int:
    """The chunk size splitting total into the fewest chunks of at most most, as evenly as possible."""
    return -(-total // -(-total // most))


def _acc(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: at least fp32."""
    return torch.promote_types(t.dtype, torch.float32)


def _merge(w_CE: torch.Tensor, w_EXY: torch.Tensor, out_CXY: torch.Tensor) -> torch.Tensor:
    """Σ_e w[c, e] · W_e for a chunk of segments into out: one GEMM over the expert axis in W's dtype (≥ fp32)."""
    out_CK = out_CXY.view(out_CXY.shape[0], -1)
    if out_CXY.dtype == w_EXY.dtype:
        return torch.mm(w_CE.to(w_EXY.dtype), w_EXY.flatten(1), out=out_CK).view(out_CXY.shape)
    out_CK.copy_(w_CE.to(w_EXY.dtype) @ w_EXY.flatten(1))
    return out_CXY


def _silu_grad(g: torch.Tensor) -> torch.Tensor:
    """d SiLU(g) / dg = σ(g) · (1 + g · (1 − σ(g)))."""
    sig = torch.sigmoid(g)
    return sig * (1 + g * (1 - sig))


TRANSPOSE_MIN_SEGMENTS_PER_EXPERT = 16
"""Forward: experts transposed once per call (token bmm's x·W̄ with plain operands) when there are at least this
many segments per expert, else merged in their own layout (x·W̄ᵀ). A transposed operand costs each segment's bmm a
repacking; a transpose costs E matrices once. CPU, 2 threads, E = 8, D 256, F 704: +0.17 ms per bmm at T = 64,
+0.05 at T = 256, against ~1 ms per transposed matrix; the forward at T = 256 (4 segments per expert) is 8% faster in
the own layout, at T = 64 (16 per expert) 1–2% slower (docs/kernels.md)."""


def forward_transposed(segments: int, experts: int) -> bool:
    """The forward's default expert layout: transposed from TRANSPOSE_MIN_SEGMENTS_PER_EXPERT segments per expert."""
    return segments >= TRANSPOSE_MIN_SEGMENTS_PER_EXPERT * experts


def _forward_weights(w_gate_EFD, w_up_EFD, w_down_EDF, acc: torch.dtype, transpose: bool):
    """Expert weights for the forward merges: (E, D, 2F) gate|up and (E, F, D) down when transposed, else as given."""
    if not transpose:
        return tuple(w.to(acc).contiguous() for w in (w_gate_EFD, w_up_EFD, w_down_EDF))  # no per-chunk flatten copy
    experts, hidden, dim = w_gate_EFD.shape
    gu_ED2F = w_gate_EFD.new_empty(experts, dim, 2 * hidden, dtype=acc)
    gu_ED2F[..., :hidden].copy_(w_gate_EFD.transpose(1, 2))
    gu_ED2F[..., hidden:].copy_(w_up_EFD.transpose(1, 2))
    down_EFD = w_down_EDF.new_empty(experts, hidden, dim, dtype=acc)
    return gu_ED2F, down_EFD.copy_(w_down_EDF.transpose(1, 2))


def _merged_forward(w_CE, weights, buffers):
    """A chunk's merged gate, up and down as right operands of x·W̄ (views of the buffers)."""
    gu_buf, down_buf = buffers
    if len(weights) == 2:  # transposed experts: buffers (C, D, 2F) and (C, F, D)
        gate_CDF, up_CDF = _merge(w_CE, weights[0], gu_buf).chunk(2, -1)
        return gate_CDF, up_CDF, _merge(w_CE, weights[1], down_buf)
    hidden = weights[0].shape[1]  # own layout: buffers (C, 2F, D) and (C, D, F)
    gate_CFD, up_CFD = _merge(w_CE, weights[0], gu_buf[:, :hidden]), _merge(w_CE, weights[1], gu_buf[:, hidden:])
    return gate_CFD.transpose(1, 2), up_CFD.transpose(1, 2), _merge(w_CE, weights[2], down_buf).transpose(1, 2)


def _gate_grad(dh_u: torch.Tensor, g: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """dh·u·SiLU'(g) into out: one fused pass in fp32/fp64; below fp32, the Triton path's rounding steps."""
    if g.dtype in (torch.float32, torch.float64):
        return torch.ops.aten.silu_backward.grad_input(dh_u, g, grad_input=out)
    return out.copy_(dh_u * _silu_grad(g))


class MergedSwiGLU(torch.autograd.Function):
    """The merged SwiGLU of every segment; backward re-merges instead of storing merged weights."""

    @staticmethod
    def forward(ctx, x_STD, w_SE, w_gate_EFD, w_up_EFD, w_down_EDF, dtype, chunk_segments, transpose):
        segments, seg_len, dim = x_STD.shape
        hidden = w_gate_EFD.shape[1]
        merged_bytes = 3 * w_gate_EFD[0].numel() * torch.finfo(dtype).bits // 8
        chunks = _chunks(segments, merged_bytes, chunk_segments, x_STD.device.type)
        transpose = forward_transposed(segments, w_gate_EFD.shape[0]) if transpose is None else transpose
        weights = _forward_weights(w_gate_EFD, w_up_EFD, w_down_EDF, _acc(w_gate_EFD), transpose)
        size = chunks[0].stop
        gu_shape, down_shape = ((dim, 2 * hidden), (hidden, dim)) if transpose else ((2 * hidden, dim), (dim, hidden))
        buffers = x_STD.new_empty(size, *gu_shape, dtype=dtype), x_STD.new_empty(size, *down_shape, dtype=dtype)
        h_CTF = x_STD.new_empty(size, seg_len, hidden, dtype=dtype)
        g_STF, u_STF = (x_STD.new_empty(segments, seg_len, hidden, dtype=dtype) for _ in range(2))
        y_STD = x_STD.new_empty(x_STD.shape, dtype=dtype)
        for c in chunks:
            n = c.stop - c.start
            x_CTD, w_CE = x_STD[c].to(dtype), w_SE[c]
            gate_CDF, up_CDF, down_CFD = _merged_forward(w_CE, weights, [b[:n] for b in buffers])
            g_CTF, u_CTF = torch.bmm(x_CTD, gate_CDF, out=g_STF[c]), torch.bmm(x_CTD, up_CDF, out=u_STF[c])
            torch.ops.aten.silu.out(g_CTF, out=h_CTF[:n]).mul_(u_CTF)
            torch.bmm(h_CTF[:n], down_CFD, out=y_STD[c])
        ctx.save_for_backward(x_STD, w_SE, w_gate_EFD, w_up_EFD, w_down_EDF, g_STF, u_STF)
        ctx.dtype, ctx.chunks = dtype, chunks
        return y_STD

    @staticmethod
    def backward(ctx, dy_STD):
        x_STD, w_SE, *weights, g_STF, u_STF = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[:2]
        grads = _backward(x_STD, w_SE, weights, (g_STF, u_STF), dy_STD, ctx.dtype, ctx.chunks, need_dx, need_dw)
        return *grads, None, None, None


def _backward(x_STD, w_SE, weights, gu_STF, dy_STD, dtype, chunks, need_dx: bool, need_dw: bool):
    """dx, dw, dW_gate, dW_up, dW_down: per chunk a re-merge, the SwiGLU backward, and the folds onto the experts.

    dx (and the gate/up re-merge it alone needs) and dw are skipped when autograd does not ask for them."""
    _, seg_len, dim = x_STD.shape
    hidden, size = weights[0].shape[1], chunks[0].stop
    acc = _acc(weights[0])
    merged_C2FD = x_STD.new_empty(size, 2 * hidden, dim, dtype=dtype) if need_dx else None
    down_CDF = x_STD.new_empty(size, dim, hidden, dtype=dtype)
    p_C2FD, p_down_CDF = x_STD.new_empty(size, 2 * hidden, dim, dtype=dtype), torch.empty_like(down_CDF)
    dgu_CT2F = x_STD.new_empty(size, seg_len, 2 * hidden, dtype=dtype)
    scratch = [x_STD.new_empty(size, seg_len, hidden, dtype=dtype) for _ in range(3)]
    dx_STD = x_STD.new_empty(x_STD.shape, dtype=dtype) if need_dx else None
    dw_SE = w_SE.new_empty(w_SE.shape, dtype=acc) if need_dw else None
    grads = [torch.empty(w.shape, dtype=acc, device=w.device) for w in weights]
    w_acc = [w.to(acc).contiguous() for w in weights]  # flattened by every chunk's merge: one copy at most
    for c in chunks:
        n = c.stop - c.start
        x_CTD, w_CE, dy_CTD = x_STD[c].to(dtype), w_SE[c], dy_STD[c].to(dtype)
        down, p_gu, p_down, dgu = _merge(w_CE, w_acc[2], down_CDF[:n]), p_C2FD[:n], p_down_CDF[:n], dgu_CT2F[:n]
        _swiglu_backward(dy_CTD, [t[c] for t in gu_STF], down, [b[:n] for b in scratch], p_down, dgu)
        torch.bmm(dgu.transpose(1, 2), x_CTD, out=p_gu)
        if need_dx:
            merged = merged_C2FD[:n]
            _merge(w_CE, w_acc[0], merged[:, :hidden])
            _merge(w_CE, w_acc[1], merged[:, hidden:])
            torch.bmm(dgu, merged, out=dx_STD[c])
        p_merged = (p_gu[:, :hidden], p_gu[:, hidden:], p_down)
        _fold(w_CE, p_merged, w_acc, grads, dw_SE[c] if need_dw else None, first=c.start == 0)
    dx_STD = dx_STD.to(x_STD.dtype) if need_dx else None
    dw_SE = dw_SE.to(w_SE.dtype) if need_dw else None
    return dx_STD, dw_SE, *(d.to(w.dtype) for d, w in zip(grads, weights))


def _swiglu_backward(dy_CTD, gu_CTF, down_CDF, scratch, p_down_CDF, dgu_CT2F) -> None:
    """The merged SwiGLU's backward inside a chunk: P_down = dyᵀ·h, dg|du into dgu (h = SiLU(g)·u recomputed)."""
    hidden = down_CDF.shape[-1]
    g_CTF, u_CTF = gu_CTF
    silu_CTF, dh_CTF, tmp_CTF = scratch
    torch.ops.aten.silu.out(g_CTF, out=silu_CTF)
    torch.bmm(dy_CTD.transpose(1, 2), torch.mul(silu_CTF, u_CTF, out=tmp_CTF), out=p_down_CDF)
    torch.bmm(dy_CTD, down_CDF, out=dh_CTF)
    torch.mul(dh_CTF, silu_CTF, out=dgu_CT2F[..., hidden:])
    _gate_grad(torch.mul(dh_CTF, u_CTF, out=tmp_CTF), g_CTF, dgu_CT2F[..., :hidden])


def _fold(w_CE, merged_grads, w_acc, grads, dw_CE, first: bool) -> None:
    """dW_e (+)= Σ_c w[c, e] · P_c (first chunk: =) and dw[c, e] = Σ ⟨W_e, P_c⟩ over the matrices, one GEMM each."""
    for i, (p_CXY, w_EXY, dw_EXY) in enumerate(zip(merged_grads, w_acc, grads)):
        p_CK = p_CXY.view(p_CXY.shape[0], -1).to(dw_EXY.dtype)
        dw_EXY.view(dw_EXY.shape[0], -1).addmm_(w_CE.to(dw_EXY.dtype).t(), p_CK, beta=0 if first else 1)
        if dw_CE is not None:
            inner_CE = _inner(p_CK, w_EXY.flatten(1))
            (dw_CE.add_ if i else dw_CE.copy_)(inner_CE)


def _inner(p_CK: torch.Tensor, w_EK: torch.Tensor) -> torch.Tensor:
    """⟨P_c, W_e⟩ for all c, e as a bmm over blocks of K, then summed: a plain (C, K) @ (K, E) GEMM with C, E
    small and K = F·D runs at a third of the memory bandwidth on CPU (MKL), the blocked one near it."""
    blocks = math.gcd(p_CK.shape[1], INNER_BLOCKS)
    p_BCk = p_CK.view(p_CK.shape[0], blocks, -1).transpose(0, 1)
    w_BkE = w_EK.view(w_EK.shape[0], blocks, -1).permute(1, 2, 0)
    return torch.bmm(p_BCk, w_BkE).sum(0)


def merged_swiglu_reference(
    x_STD, w_SE, w_gate_EFD, w_up_EFD, w_down_EDF, chunk_segments: int | None = None, transpose: bool | None = None
) -> torch.Tensor:
    """The reference path (CPU and GPU), in the autocast dtype when autocast is on, else x's dtype.

    transpose: the forward's expert layout (None: by TRANSPOSE_MIN_SEGMENTS_PER_EXPERT); both give the same values."""
    device = x_STD.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x_STD.dtype
    with torch.autocast(device, enabled=False):
        return MergedSwiGLU.apply(x_STD, w_SE, w_gate_EFD, w_up_EFD, w_down_EDF, dtype, chunk_segments, transpose)


def resolve_merge_impl(impl: str, device: torch.device) -> str:
    """moe.merge_impl resolved for a device, logged once: auto = triton on CUDA when the kernels import, the
    fused CPU kernel (`cpu`) on a CPU when it builds, else the reference.

    Explicit `triton` also runs on the CPU under the Triton interpreter (TRITON_INTERPRET=1): slow, for tests.
    """
    if impl == "triton" and not (_triton_runs_on(device) and _triton_available()):
        where = "could not import megamoe_kernels.lory" if _triton_runs_on(device) else "needs a CUDA device"
        raise ConfigError("moe.merge_impl", f"triton {where}; use reference or auto")
    if impl == "cpu" and (device.type != "cpu" or lory_cpu.unavailable() is not None):
        why = "the fused CPU kernel runs on the CPU only" if device.type != "cpu" else lory_cpu.unavailable()
        raise ConfigError("moe.merge_impl", f"cpu: {why}; use reference or auto")
    chosen = impl if impl != "auto" else _auto(device)
    if (impl, device.type, chosen) not in _LOGGED:
        _LOGGED.add((impl, device.type, chosen))
        log.info("lory: moe.merge_impl=%s on %s -> %s merge", impl, device.type, chosen)
    return chosen


def _auto(device: torch.device) -> str:
    """What auto picks: the fused kernels of the device where they run, else the reference."""
    if device.type == "cuda":
        return "triton" if _triton_available() else "reference"
    if device.type == "cpu" and lory_cpu.unavailable() is None:
        return "cpu"
    return "reference"


_LOGGED: set[tuple[str, str, str]] = set()


def _triton_runs_on(device: torch.device) -> bool:
    """Triton kernels run on CUDA, or on the CPU under the interpreter (TRITON_INTERPRET=1, for tests)."""
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def _triton_available() -> bool:
    """The fused merge kernels import (Triton present, kernels installed)."""
    try:
        import megamoe_kernels.lory  # noqa: F401
    except ImportError:
        return False
    return True


def merged_swiglu(x_STD, w_SE, w_gate_EFD, w_up_EFD, w_down_EDF, impl: str = "reference") -> torch.Tensor:
    """y_STD for every segment (impl already resolved by resolve_merge_impl; `cpu` serves fp32 and fp64
    without autocast, and hands anything else to the reference)."""
    if impl == "cpu" and lory_cpu.supports(x_STD, w_SE, w_gate_EFD, w_up_EFD, w_down_EDF):
        return lory_cpu.merged_swiglu_fused(x_STD, w_SE, w_gate_EFD, w_up_EFD, w_down_EDF)
    if impl == "triton":
        from megamoe.ops.lory_triton import merged_swiglu_triton

        return merged_swiglu_triton(x_STD, w_SE, w_gate_EFD, w_up_EFD, w_down_EDF)
    return merged_swiglu_reference(x_STD, w_SE, w_gate_EFD, w_up_EFD, w_down_EDF)
