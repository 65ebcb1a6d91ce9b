"""Cross-entropy fused with the output layer (train.loss_chunk_tokens): per-token losses from hidden states.

Shape legend: N tokens, D width, V vocabulary (this rank's rows under tensor parallelism), C tokens
of one chunk.

The plain path holds the (N, V) logits, their log-softmax and their gradient whole: with a 4,096-token
micro-batch and a 4,096-word vocabulary each is 64 MiB, and at a 128k vocabulary they dwarf the
model's other activations. Here forward walks the tokens C at a time and keeps only each token's
log-sum-exp; backward recomputes a chunk's logits, turns them into their gradient in place
(softmax − one-hot, times the upstream gradient) and multiplies that into the gradients of the
hidden states and the weight. So no (N, V) tensor exists, at the price of one more (C, D) × (D, V)
matmul per chunk (the logits' recompute).

Under tensor parallelism each rank holds V/tp rows of the weight (vocab-parallel, rows from
`vocab_start`); the max, the sum of exponentials and the target's logit are all-reduced over the
TP group, as megatron-core's vocab_parallel_cross_entropy does. The caller enters the TP region
first (copy-to, or the sequence gather under SP), whose backward sums the hidden states' gradient.

`reference_linear_cross_entropy` is the plain path (one matmul, F.cross_entropy in fp32); the tests
compare the two in losses and gradients.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def reference_linear_cross_entropy(h_ND: torch.Tensor, w_VD: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
    """The obviously correct path (single process): logits, then fp32 cross-entropy → loss_N."""
    return F.cross_entropy(F.linear(h_ND, w_VD).float(), targets_N, reduction="none")


def _local_targets(targets_C: torch.Tensor, vocab_start: int, vocab_local: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask of targets in this rank's rows, their row index, 0 where masked)."""
    local_C = targets_C - vocab_start
    mine_C = (local_C >= 0) & (local_C < vocab_local)
    return mine_C, torch.where(mine_C, local_C, torch.zeros_like(local_C))


def _chunk_loss(logits_CV: torch.Tensor, targets_C: torch.Tensor, group, vocab_start: int):
    """(log-sum-exp_C, loss_C) of one chunk's fp32 logits (the logits are overwritten)."""
    max_C = logits_CV.max(dim=-1).values
    if group is not None:
        dist.all_reduce(max_C, op=dist.ReduceOp.MAX, group=group)
    mine_C, rows_C = _local_targets(targets_C, vocab_start, logits_CV.shape[-1])
    target_C = logits_CV.gather(-1, rows_C[:, None]).squeeze(-1) * mine_C
    sums_2C = torch.stack([logits_CV.sub_(max_C[:, None]).exp_().sum(dim=-1), target_C])
    if group is not None:
        dist.all_reduce(sums_2C, group=group)
    lse_C = max_C + sums_2C[0].log()
    return lse_C, lse_C - sums_2C[1]


class _LinearCrossEntropy(torch.autograd.Function):
    """loss_N = logsumexp(h W^T) − (h W^T)[target], C tokens at a time (see the module docstring)."""

    @staticmethod
    def forward(ctx, h_ND, w_VD, targets_N, chunk: int, group, vocab_start: int):
        """Losses; keeps h, W, the targets and each token's log-sum-exp for backward."""
        lse_N = h_ND.new_empty(h_ND.shape[0], dtype=torch.float32)
        loss_N = torch.empty_like(lse_N)
        for s in range(0, h_ND.shape[0], chunk):
            logits_CV = (h_ND[s : s + chunk] @ w_VD.t()).float()
            lse_C, loss_C = _chunk_loss(logits_CV, targets_N[s : s + chunk], group, vocab_start)
            lse_N[s : s + chunk], loss_N[s : s + chunk] = lse_C, loss_C
        ctx.save_for_backward(h_ND, w_VD, targets_N, lse_N)
        ctx.chunk, ctx.vocab_start = chunk, vocab_start
        return loss_N

    @staticmethod
    def backward(ctx, grad_N):
        """dh = G W and dW = Gᵀ h, with G = (softmax − one-hot) · grad, one chunk's logits recomputed at a time."""
        h_ND, w_VD, targets_N, lse_N = ctx.saved_tensors
        chunk, vocab_local = ctx.chunk, w_VD.shape[0]
        grad_h_ND = torch.empty_like(h_ND)
        grad_w_VD = torch.zeros(w_VD.shape, dtype=torch.float32, device=w_VD.device)
        for s in range(0, h_ND.shape[0], chunk):
            h_CD = h_ND[s : s + chunk]
            g_CV = (h_CD @ w_VD.t()).float().sub_(lse_N[s : s + chunk, None]).exp_()
            mine_C, rows_C = _local_targets(targets_N[s : s + chunk], ctx.vocab_start, vocab_local)
            g_CV.scatter_add_(-1, rows_C[:, None], -mine_C[:, None].float())
            g_CV = g_CV.mul_(grad_N[s : s + chunk, None]).to(h_ND.dtype)
            grad_h_ND[s : s + chunk] = g_CV @ w_VD
            grad_w_VD += (g_CV.t() @ h_CD).float()
        return grad_h_ND, grad_w_VD.to(w_VD.dtype), None, None, None, None


def linear_cross_entropy(
    h_ND: torch.Tensor,
    w_VD: torch.Tensor,
    targets_N: torch.Tensor,
    chunk: int,
    group: dist.ProcessGroup | None = None,
    vocab_start: int = 0,
) -> torch.Tensor:
    """Per-token fp32 cross-entropy of F.linear(h, w) without the (N, V) logits; under autocast in its dtype."""
    if chunk <= 0:
        raise ValueError(f"train.loss_chunk_tokens must be positive to fuse the loss, got {chunk}")
    kind = h_ND.device.type
    if torch.is_autocast_enabled(kind):
        dtype = torch.get_autocast_dtype(kind)
        h_ND, w_VD = h_ND.to(dtype), w_VD.to(dtype)
    with torch.autocast(kind, enabled=False):
        return _LinearCrossEntropy.apply(h_ND.contiguous(), w_VD, targets_N.contiguous(), chunk, group, vocab_start)
