"""Grouped linear: tokens sorted by expert, each expert's rows times its own weight, in one batched op.

Shape legend: N tokens (sorted by expert), E experts, M the largest token count of an expert,
I/O in/out features. Paths: `torch._grouped_mm` (one grouped GEMM, no padding) on CPU and on
CUDA in bf16 on sm90+; otherwise, and for static shapes (moe.pad_to_capacity), a padded batched
matmul: rows scattered into an E × M × I buffer, one bmm. Padding costs E × M rows, up to E× the
useful work when routing is skewed (docs/benchmarks.md). Both paths are tested against
`reference.grouped_linear_loop`, outputs and gradients.
"""

from __future__ import annotations

import torch


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (torch._grouped_mm needs it)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _use_grouped_mm(x_NI: torch.Tensor) -> bool:
    """torch._grouped_mm supports this tensor: fp32/bf16/fp16 on CPU, or bf16 on a CUDA device of capability 9+."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x_NI.device.type == "cpu":
        return x_NI.dtype in (torch.float32, torch.bfloat16, torch.float16)
    return x_NI.is_cuda and x_NI.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x_NI.device)[0] >= 9


def _slots(counts_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert, slot-within-expert) of each sorted row."""
    expert_N = torch.repeat_interleave(torch.arange(len(counts_E), device=counts_E.device), counts_E)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    slot_N = torch.arange(len(expert_N), device=counts_E.device) - starts_E[expert_N]
    return expert_N, slot_N


def padded_grouped_linear(
    x_NI: torch.Tensor, w_EOI: torch.Tensor, counts_E: torch.Tensor, rows_per_expert: int | None = None
) -> torch.Tensor:
    """Scatter rows into a zero-padded E × M × I buffer (M = rows_per_expert or the largest count), one bmm."""
    if x_NI.shape[0] == 0:
        # Keep x and w in the graph: a rank that received no rows must still run the backward
        # (its collectives pair with the other ranks') and give w a (zero) gradient.
        return x_NI @ w_EOI[0].t() + 0 * w_EOI.sum()
    expert_N, slot_N = _slots(counts_E)
    rows = rows_per_expert or int(counts_E.max())
    flat_N = expert_N * rows + slot_N  # row of each token in the flattened E·M buffer
    buffer_EMI = x_NI.new_zeros(len(counts_E) * rows, x_NI.shape[1]).index_copy(0, flat_N, x_NI)
    y_EMO = torch.bmm(buffer_EMI.view(len(counts_E), rows, -1), w_EOI.transpose(1, 2))
    return y_EMO.flatten(0, 1).index_select(0, flat_N)


def grouped_linear(
    x_NI: torch.Tensor, w_EOI: torch.Tensor, counts_E: torch.Tensor, rows_per_expert: int | None = None
) -> torch.Tensor:
    """y_NO: rows of expert e (the e-th run of counts_E rows) times w_EOI[e]ᵀ.

    rows_per_expert pads every expert to that many rows (static shapes, moe.pad_to_capacity).
    """
    if rows_per_expert is None and _use_grouped_mm(x_NI):
        offsets_E = torch.cumsum(counts_E, 0).to(torch.int32)
        return _ContiguousGrad.apply(torch._grouped_mm(x_NI, w_EOI.transpose(1, 2), offs=offsets_E))
    return padded_grouped_linear(x_NI, w_EOI, counts_E, rows_per_expert)
