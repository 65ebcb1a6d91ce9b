"""Lory's merged SwiGLU: each segment's tokens through an FFN whose weights are the segment's
routing-weighted average of the experts' weights (parameter space, not output mixing).

Shape legend: S segments, C segments in one chunk, T tokens per segment, D width, F FFN width
(this rank's slice under expert-wise model parallelism), E experts.
  W̄_s = Σ_e w[s, e] · W_e   for W ∈ {gate, up, down};   y_s = W̄_down,s (SiLU(W̄_gate,s x) ⊙ W̄_up,s x)

`reference` is a custom autograd function. Segments are processed in chunks. Per chunk, each
matrix is merged with one GEMM over the expert axis, then one bmm per matrix runs the tokens.
Backward keeps only what a dense SwiGLU keeps (x and the gate/up pre-activations). It re-merges
the chunk's weights — E/T of the FFN FLOPs — instead of storing merged copies, which would be
3·F·D per segment and far larger than the activations. The merge and the weight gradients
accumulate in (at least) fp32; the matmuls run in the autocast dtype. `triton` (kernels/lory.py
through megamoe.ops.lory_triton) merges weight tiles in registers and never writes merged weights;
`auto` picks Triton on CUDA when the kernels import, else the reference; `megamoe.ops.lory_check` self-checks the
kernels before they serve a device, dtype and shape class.
`megamoe.ops.reference.merged_swiglu_loop` is the slow oracle.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

MERGE_CHUNK_BYTES = {"cpu": 16 * 2**20, "cuda": 256 * 2**20}
"""Merged weights of one chunk (alive at once; twice that with their gradients in backward). On a CPU
a chunk that stays in cache is fastest: T = 64, E = 8, F·D = 704·256 runs fwd+bwd in 314 ms with
chunks of 16 segments and 551 ms with all 128 at once (1 segment per chunk: 622 ms)."""


def _chunks(segments: int, per_segment_bytes: int, chunk_segments: int | None, device: str) -> list[slice]:
    """Segment ranges processed together (bounded merged-weight memory)."""
    budget = MERGE_CHUNK_BYTES.get(device, MERGE_CHUNK_BYTES["cuda"])
    size = chunk_segments or max(1, budget // per_segment_bytes)
    return [slice(s, min(s + size, segments)) for s in range(0, segments, size)]


def _acc(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: at least fp32."""
    return torch.promote_types(t.dtype, torch.float32)


def _merge(w_CE: torch.Tensor, w_EXY: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Σ_e w[c, e] · W_e for a chunk of segments: one GEMM over the expert axis in ≥ fp32, cast to dtype."""
    acc = _acc(w_EXY)
    merged = w_CE.to(acc) @ w_EXY.to(acc).flatten(1)
    return merged.view(w_CE.shape[0], *w_EXY.shape[1:]).to(dtype)


def _silu_grad(g: torch.Tensor) -> torch.Tensor:
    """d SiLU(g) / dg = σ(g) · (1 + g · (1 − σ(g)))."""
    sig = torch.sigmoid(g)
    return sig * (1 + g * (1 - sig))


class MergedSwiGLU(torch.autograd.Function):
    """The merged SwiGLU of every segment; backward re-merges instead of storing merged weights."""

    @staticmethod
    def forward(ctx, x_STD, w_SE, w_gate_EFD, w_up_EFD, w_down_EDF, dtype, chunk_segments):
        segments, seg_len, _ = x_STD.shape
        hidden = w_gate_EFD.shape[1]
        merged_bytes = 3 * w_gate_EFD[0].numel() * torch.finfo(dtype).bits // 8
        chunks = _chunks(segments, merged_bytes, chunk_segments, x_STD.device.type)
        g_STF = x_STD.new_empty(segments, seg_len, hidden, dtype=dtype)
        u_STF = torch.empty_like(g_STF)
        y_STD = x_STD.new_empty(x_STD.shape, dtype=dtype)
        for c in chunks:
            x_CTD, w_CE = x_STD[c].to(dtype), w_SE[c]
            g_STF[c] = torch.bmm(x_CTD, _merge(w_CE, w_gate_EFD, dtype).transpose(1, 2))
            u_STF[c] = torch.bmm(x_CTD, _merge(w_CE, w_up_EFD, dtype).transpose(1, 2))
            y_STD[c] = torch.bmm(F.silu(g_STF[c]) * u_STF[c], _merge(w_CE, w_down_EDF, dtype).transpose(1, 2))
        ctx.save_for_backward(x_STD, w_SE, w_gate_EFD, w_up_EFD, w_down_EDF, g_STF, u_STF)
        ctx.dtype, ctx.chunks = dtype, chunks
        return y_STD

    @staticmethod
    def backward(ctx, dy_STD):
        x_STD, w_SE, *weights, g_STF, u_STF = ctx.saved_tensors
        dtype = ctx.dtype
        dx_STD = torch.zeros_like(x_STD)
        dw_SE = torch.zeros(w_SE.shape, dtype=_acc(weights[0]), device=w_SE.device)
        dweights = [torch.zeros(w.shape, dtype=_acc(w), device=w.device) for w in weights]
        for c in ctx.chunks:
            x_CTD, w_CE, dy_CTD = x_STD[c].to(dtype), w_SE[c], dy_STD[c].to(dtype)
            gate_CFD, up_CFD, down_CDF = (_merge(w_CE, w, dtype) for w in weights)
            g_CTF, u_CTF = g_STF[c], u_STF[c]
            silu_CTF = F.silu(g_CTF)
            d_down_CDF = torch.bmm(dy_CTD.transpose(1, 2), silu_CTF * u_CTF)
            dh_CTF = torch.bmm(dy_CTD, down_CDF)
            du_CTF = dh_CTF * silu_CTF
            dg_CTF = dh_CTF * u_CTF * _silu_grad(g_CTF)
            d_gate_CFD = torch.bmm(dg_CTF.transpose(1, 2), x_CTD)
            d_up_CFD = torch.bmm(du_CTF.transpose(1, 2), x_CTD)
            dx_STD[c] = (torch.bmm(dg_CTF, gate_CFD) + torch.bmm(du_CTF, up_CFD)).to(dx_STD.dtype)
            for d_merged, w, dw in zip((d_gate_CFD, d_up_CFD, d_down_CDF), weights, dweights):
                d_flat = d_merged.to(dw.dtype).flatten(1)
                dw += (w_CE.to(dw.dtype).t() @ d_flat).view(w.shape)
                dw_SE[c] += d_flat @ w.to(dw.dtype).flatten(1).t()
        return dx_STD, dw_SE.to(w_SE.dtype), *(d.to(w.dtype) for d, w in zip(dweights, weights)), None, None


def merged_swiglu_reference(
    x_STD, w_SE, w_gate_EFD, w_up_EFD, w_down_EDF, chunk_segments: int | None = None
) -> torch.Tensor:
    """The reference path (CPU and GPU), in the autocast dtype when autocast is on, else x's dtype."""
    device = x_STD.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x_STD.dtype
    with torch.autocast(device, enabled=False):
        return MergedSwiGLU.apply(x_STD, w_SE, w_gate_EFD, w_up_EFD, w_down_EDF, dtype, chunk_segments)


def resolve_merge_impl(impl: str, device: torch.device) -> str:
    """moe.merge_impl resolved for a device (auto = triton on CUDA when the kernels import), logged once.

    Explicit `triton` also runs on the CPU under the Triton interpreter (TRITON_INTERPRET=1): slow, for tests.
    """
    available = _triton_runs_on(device) and _triton_available()
    if impl == "triton" and not available:
        from megamoe.errors import ConfigError

        where = "could not import megamoe_kernels.lory" if _triton_runs_on(device) else "needs a CUDA device"
        raise ConfigError("moe.merge_impl", f"triton {where}; use reference or auto")
    chosen = "triton" if available and (impl == "triton" or (device.type == "cuda" and impl == "auto")) else "reference"
    if (impl, device.type, chosen) not in _LOGGED:
        _LOGGED.add((impl, device.type, chosen))
        log.info("lory: moe.merge_impl=%s on %s -> %s merge", impl, device.type, chosen)
    return chosen


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
    """y_STD for every segment (impl already resolved by resolve_merge_impl)."""
    if impl == "triton":
        from megamoe.ops.lory_triton import merged_swiglu_triton

        return merged_swiglu_triton(x_STD, w_SE, w_gate_EFD, w_up_EFD, w_down_EDF)
    return merged_swiglu_reference(x_STD, w_SE, w_gate_EFD, w_up_EFD, w_down_EDF)
