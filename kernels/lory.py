"""Triton kernels for Lory's merged SwiGLU: expert weights merged tile by tile, never written merged.

Shape legend: S segments, T tokens per segment, E experts (P = E padded to a power of two),
K the contraction width, N the output width, M × N a weight matrix.

`merged_matmul`: Y_s = A_s · (Σ_e w[s, e] · W_e)ᵀ for every segment s. Each program owns a
(segment, T-tile, N-tile) block; for every K-block it loads the E expert tiles of W, sums them
weighted by w[s, :] in fp32 registers, casts the merged tile to A's dtype and feeds it to the
dot. The forward (gate, up, down) and the input gradients (through transposed strides of W) are
this kernel.

`merged_weight_grad`: with P_s = A_sᵀ · B_s (the gradient of the merged weight of segment s),
dW_e = Σ_s w[s, e] · P_s and dw[s, e] = ⟨W_e, P_s⟩. Each program owns one (M-tile, N-tile)
of the weight: it keeps all E expert tiles of W and of dW in registers, loops over segments,
forms its tile of P_s with one dot over the segment's tokens, and folds it into the E
accumulators and the E dot products. P_s exists only as a register tile; dw comes back as one
partial sum per weight tile, reduced by the caller. Device code only: the autograd function is
`megamoe.ops.lory_triton`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a · b with fp32 accumulation; UPCAST (the interpreter) multiplies fp32 copies of the operands."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _cast(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """x (fp32) in dtype, rounded to nearest-even; the interpreter truncates, so there bf16 is rounded by hand."""
    if UPCAST and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(dtype)
    return x.to(dtype)


@triton.jit
def _merged_matmul_kernel(
    a_ptr, w_ptr, mix_ptr, y_ptr,
    T, N, K, E,
    sa_s, sa_t, sa_k,
    sw_e, sw_n, sw_k,
    sm_s, sm_e,
    sy_s, sy_t, sy_n,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """One (segment, T-tile, N-tile) block of A_s · (Σ_e w[s, e] W_e)ᵀ."""
    seg = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    pid_t, pid_n = tl.program_id(1) // tiles_n, tl.program_id(1) % tiles_n
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a_mask = (offs_t[:, None] < T) & (offs_k[None, :] < K)
        a_ptrs = a_ptr + seg * sa_s + offs_t[:, None] * sa_t + offs_k[None, :] * sa_k
        a = tl.load(a_ptrs, mask=a_mask, other=0.0)
        w_mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        w_ptrs = w_ptr + offs_n[:, None] * sw_n + offs_k[None, :] * sw_k
        merged = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for e in range(0, E):
            weight = tl.load(mix_ptr + seg * sm_s + e * sm_e).to(tl.float32)
            merged += weight * tl.load(w_ptrs + e * sw_e, mask=w_mask, other=0.0).to(tl.float32)
        acc += _dot(a, tl.trans(_cast(merged, a.dtype, UPCAST)), PRECISION, UPCAST)
    y_ptrs = y_ptr + seg * sy_s + offs_t[:, None] * sy_t + offs_n[None, :] * sy_n
    tl.store(y_ptrs, _cast(acc, y_ptr.dtype.element_ty, UPCAST), mask=(offs_t[:, None] < T) & (offs_n[None, :] < N))


@triton.jit
def _merged_weight_grad_kernel(
    a_ptr, b_ptr, w_ptr, mix_ptr, dw_ptr, dmix_ptr,
    S, T, M, N, E,
    sa_s, sa_t, sa_m,
    sb_s, sb_t, sb_n,
    sw_e, sw_m, sw_n,
    sm_s, sm_e,
    BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, E_PAD: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """One (M-tile, N-tile) of dW_e = Σ_s w[s, e] A_sᵀB_s for all e, and this tile's share of ⟨W_e, A_sᵀB_s⟩."""
    tile = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    offs_m = (tile // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (tile % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, E_PAD)
    mn_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    emn_mask = (offs_e[:, None, None] < E) & mn_mask[None, :, :]
    emn_offs = offs_e[:, None, None] * sw_e + offs_m[None, :, None] * sw_m + offs_n[None, None, :] * sw_n
    w_tile = tl.load(w_ptr + emn_offs, mask=emn_mask, other=0.0).to(tl.float32)
    acc = tl.zeros((E_PAD, BLOCK_M, BLOCK_N), dtype=tl.float32)
    for seg in range(0, S):
        p = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            a_ptrs = a_ptr + seg * sa_s + offs_t[:, None] * sa_t + offs_m[None, :] * sa_m
            a = tl.load(a_ptrs, mask=(offs_t[:, None] < T) & (offs_m[None, :] < M), other=0.0)
            b_ptrs = b_ptr + seg * sb_s + offs_t[:, None] * sb_t + offs_n[None, :] * sb_n
            b = tl.load(b_ptrs, mask=(offs_t[:, None] < T) & (offs_n[None, :] < N), other=0.0)
            p += _dot(tl.trans(a), b, PRECISION, UPCAST)
        mix = tl.load(mix_ptr + seg * sm_s + offs_e * sm_e, mask=offs_e < E, other=0.0).to(tl.float32)
        acc += mix[:, None, None] * p[None, :, :]
        dmix = tl.sum(tl.sum(w_tile * p[None, :, :], axis=2), axis=1)
        tl.store(dmix_ptr + (tile * S + seg) * E_PAD + offs_e, dmix)
    tl.store(dw_ptr + emn_offs, acc, mask=emn_mask)


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
"""Under the Triton interpreter (Triton 3.9) a bf16 tl.dot returns garbage and fp32 → bf16 casts truncate. There
the dot operands are upcast to fp32 (a bf16 × bf16 product is exact in fp32: the same function with fp32
accumulation) and bf16 casts are rounded to nearest-even by hand, as the GPU does."""


def _precision() -> str:
    """fp32 dots in TF32 only when torch allows TF32 matmuls (as cuBLAS would), else IEEE fp32."""
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _block(size: int, cap: int) -> int:
    """A power-of-two tile edge ≥ 16 (tl.dot's minimum), at most cap, not much larger than size."""
    return max(16, min(cap, triton.next_power_of_2(size)))


def merged_matmul(
    a_STK: torch.Tensor, mix_SE: torch.Tensor, w_ENK: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Y_STN = A_s · (Σ_e mix[s, e] W_e)ᵀ per segment, in A's dtype (fp32 accumulation); W may be a strided view."""
    segs, tokens, width = a_STK.shape
    experts, width_out, _ = w_ENK.shape
    y_STN = a_STK.new_empty(segs, tokens, width_out) if out is None else out
    bt, bn, bk = _block(tokens, 64), _block(width_out, 64), _block(width, 32)
    grid = (segs, triton.cdiv(tokens, bt) * triton.cdiv(width_out, bn))
    _merged_matmul_kernel[grid](
        a_STK, w_ENK, mix_SE, y_STN,
        tokens, width_out, width, experts,
        *a_STK.stride(), *w_ENK.stride(), *mix_SE.stride(), *y_STN.stride(),
        BLOCK_T=bt, BLOCK_N=bn, BLOCK_K=bk, PRECISION=_precision(), UPCAST=INTERPRETED,
    )  # fmt: skip
    return y_STN


def merged_weight_grad(
    a_STM: torch.Tensor, b_STN: torch.Tensor, mix_SE: torch.Tensor, w_EMN: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dW_EMN = Σ_s mix[s, e] A_sᵀB_s in fp32, dmix_SE = ⟨W_e, A_sᵀB_s⟩ in fp32)."""
    segs, tokens, rows = a_STM.shape
    w_EMN = w_EMN.contiguous()  # dW is written with W's strides
    experts, _, cols = w_EMN.shape
    e_pad = triton.next_power_of_2(experts)
    cap = 32 if e_pad <= 8 else 16  # E_PAD × BLOCK_M × BLOCK_N fp32 accumulators live in registers
    bt, bm, bn = _block(tokens, 32), _block(rows, cap), _block(cols, cap)
    tiles = triton.cdiv(rows, bm) * triton.cdiv(cols, bn)
    dw_EMN = torch.empty(w_EMN.shape, dtype=torch.float32, device=w_EMN.device)
    dmix_tile_SP = torch.empty(tiles, segs, e_pad, dtype=torch.float32, device=w_EMN.device)
    _merged_weight_grad_kernel[(tiles,)](
        a_STM, b_STN, w_EMN, mix_SE, dw_EMN, dmix_tile_SP,
        segs, tokens, rows, cols, experts,
        *a_STM.stride(), *b_STN.stride(), *w_EMN.stride(), *mix_SE.stride(),
        BLOCK_T=bt, BLOCK_M=bm, BLOCK_N=bn, E_PAD=e_pad, PRECISION=_precision(), UPCAST=INTERPRETED,
    )  # fmt: skip
    return dw_EMN, dmix_tile_SP.sum(0)[:, :experts]
