"""Lory's merged SwiGLU through the fused Triton kernels (`megamoe_kernels.lory`), with autograd.

Shape legend: S segments, T tokens per segment, D width, F FFN width, E experts.
Forward: g = X·Ḡᵀ, u = X·Ūᵀ, h = SiLU(g)·u, y = h·D̄ᵀ, each product a merged matmul whose merged
weight tiles exist only in registers. Backward: dh = dy·D̄ (W_down read transposed through its
strides), dg and du elementwise, dX = dg·Ḡ + du·Ū, and for each matrix one weight-gradient
kernel giving dW_e and that matrix's share of dw. What is saved is what a dense SwiGLU saves
(x, g, u) plus the routing weights; no per-segment merged weight or weight gradient is ever in
memory. The autocast dtype (else x's) is the matmul dtype, as in `megamoe.ops.lory`'s reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megamoe.ops.lory import _silu_grad


class MergedSwiGLUTriton(torch.autograd.Function):
    """Forward and backward of every segment's merged SwiGLU in Triton kernels."""

    @staticmethod
    def forward(ctx, x_STD, w_SE, w_gate_EFD, w_up_EFD, w_down_EDF, dtype):
        from megamoe_kernels.lory import merged_matmul

        x_STD_c = x_STD.to(dtype)
        g_STF = merged_matmul(x_STD_c, w_SE, w_gate_EFD)
        u_STF = merged_matmul(x_STD_c, w_SE, w_up_EFD)
        y_STD = merged_matmul(F.silu(g_STF) * u_STF, w_SE, w_down_EDF)
        ctx.save_for_backward(x_STD, w_SE, w_gate_EFD, w_up_EFD, w_down_EDF, g_STF, u_STF)
        ctx.dtype = dtype
        return y_STD

    @staticmethod
    def backward(ctx, dy_STD):
        from megamoe_kernels.lory import merged_matmul, merged_weight_grad

        x_STD, w_SE, w_gate, w_up, w_down, g_STF, u_STF = ctx.saved_tensors
        x_STD_c, dy_STD = x_STD.to(ctx.dtype), dy_STD.to(ctx.dtype)
        dh_STF = merged_matmul(dy_STD, w_SE, w_down.transpose(1, 2))
        silu_STF = F.silu(g_STF)
        du_STF = dh_STF * silu_STF
        dg_STF = dh_STF * u_STF * _silu_grad(g_STF)
        dx_STD = merged_matmul(dg_STF, w_SE, w_gate.transpose(1, 2)) + merged_matmul(du_STF, w_SE, w_up.transpose(1, 2))
        d_gate, dw_gate = merged_weight_grad(dg_STF, x_STD_c, w_SE, w_gate)
        d_up, dw_up = merged_weight_grad(du_STF, x_STD_c, w_SE, w_up)
        d_down, dw_down = merged_weight_grad(dy_STD, silu_STF * u_STF, w_SE, w_down)
        dw_SE = (dw_gate + dw_up + dw_down).to(w_SE.dtype)
        grads = (d.to(w.dtype) for d, w in ((d_gate, w_gate), (d_up, w_up), (d_down, w_down)))
        return dx_STD.to(x_STD.dtype), dw_SE, *grads, None


def merged_swiglu_triton(x_STD, w_SE, w_gate_EFD, w_up_EFD, w_down_EDF) -> torch.Tensor:
    """The fused path, in the autocast dtype when autocast is on, else x's dtype."""
    device = x_STD.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x_STD.dtype
    with torch.autocast(device, enabled=False):
        return MergedSwiGLUTriton.apply(x_STD, w_SE, w_gate_EFD, w_up_EFD, w_down_EDF, dtype)
