"""The cross-entropy fused with the output layer (train.loss_chunk_tokens) against the plain path.

Tolerances: both paths round differently (chunked matmuls, another summation order of the
exponentials and of the weight gradient), so neither is the truth. The truth is the float64 plain
path; the fused fp32 (or bf16) result must be as close to it as the plain fp32 (bf16) result is,
within a factor 2, plus one ulp of the largest value. The model-level test runs a float64 model,
whose loss is still fp32 on both paths (megamoe's contract): its truth is the float64 model with a
float64 cross-entropy, and the same bound applies to the loss and every parameter's gradient.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from megamoe.config import ModelConfig, MoEConfig
from megamoe.model import build_model
from megamoe.model.moe.noise import RoutingContext
from megamoe.ops.linear_ce import linear_cross_entropy, reference_linear_cross_entropy

N, D, V = 50, 16, 37


def inputs(dtype=torch.float32, seed: int = 0):
    """Hidden states, weight, targets and non-uniform upstream gradients (as a masked or weighted loss gives)."""
    gen = torch.Generator().manual_seed(seed)
    h_ND = torch.randn(N, D, generator=gen, dtype=torch.float64)
    w_VD = torch.randn(V, D, generator=gen, dtype=torch.float64) / D**0.5
    targets_N = torch.randint(0, V, (N,), generator=gen)
    grad_N = torch.rand(N, generator=gen, dtype=torch.float64)
    return h_ND.to(dtype), w_VD.to(dtype), targets_N, grad_N


def loss_and_grads(fn, h_ND, w_VD, targets_N, grad_N, **kw):
    """(loss_N, dh, dW) of one path, in float64 for comparison."""
    h_ND, w_VD = h_ND.clone().requires_grad_(), w_VD.clone().requires_grad_()
    loss_N = fn(h_ND, w_VD, targets_N, **kw)
    loss_N.backward(grad_N.to(loss_N.dtype))
    return [t.detach().double() for t in (loss_N, h_ND.grad, w_VD.grad)]


def assert_as_accurate(fused, plain, exact, eps: float, names=("loss", "dh", "dW")):
    """Each fused tensor is within 2× the plain path's error of the float64 truth (+ one ulp of its scale)."""
    for name, f, p, e in zip(names, fused, plain, exact, strict=True):
        bound = 2 * (p - e).abs().max() + eps * e.abs().max()
        assert (f - e).abs().max() <= bound, f"{name}: fused error {(f - e).abs().max():.3g} > {bound:.3g}"


@pytest.mark.parametrize("chunk", [1, 7, N, 4 * N])
def test_fused_loss_and_gradients_match_the_plain_path(chunk):
    h, w, t, g = inputs()
    exact = loss_and_grads(reference_linear_cross_entropy, h.double(), w.double(), t, g)
    plain = loss_and_grads(reference_linear_cross_entropy, h, w, t, g)
    fused = loss_and_grads(linear_cross_entropy, h, w, t, g, chunk=chunk)
    assert_as_accurate(fused, plain, exact, torch.finfo(torch.float32).eps)


def test_fused_loss_under_bf16_autocast_is_as_accurate_as_the_plain_path():
    h, w, t, g = inputs()
    exact = loss_and_grads(reference_linear_cross_entropy, h.double(), w.double(), t, g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = loss_and_grads(reference_linear_cross_entropy, h, w, t, g)
        fused = loss_and_grads(linear_cross_entropy, h, w, t, g, chunk=16)
    assert_as_accurate(fused, plain, exact, torch.finfo(torch.bfloat16).eps)


def test_a_wrong_gradient_term_is_caught():
    """Planted: the one-hot not subtracted for the last chunk's tokens: dh is off by O(0.1)."""
    h, w, t, g = inputs()
    exact = loss_and_grads(reference_linear_cross_entropy, h.double(), w.double(), t, g)
    plain = loss_and_grads(reference_linear_cross_entropy, h, w, t, g)
    fused = loss_and_grads(linear_cross_entropy, h, w, t, g, chunk=7)
    fused[1][-(N % 7) :] += g[-(N % 7) :, None] * w.double()[t[-(N % 7) :]]
    with pytest.raises(AssertionError, match="dh"):
        assert_as_accurate(fused, plain, exact, torch.finfo(torch.float32).eps)


def test_a_non_positive_chunk_is_refused():
    h, w, t, _ = inputs()
    with pytest.raises(ValueError, match=r"train\.loss_chunk_tokens"):
        linear_cross_entropy(h, w, t, 0)


def _vocab_parallel_rank(rank: int, world: int, port: int, queue) -> None:
    """One TP rank: this rank's vocabulary rows; dh summed over ranks as the TP region's backward does."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    h, w, t, g = inputs()
    rows = V // world + 1
    w_local = w[rank * rows : (rank + 1) * rows]
    loss, dh, dw = loss_and_grads(
        linear_cross_entropy, h, w_local, t, g, chunk=9, group=dist.group.WORLD, vocab_start=rank * rows
    )
    dist.all_reduce(dh)
    queue.put((rank, *(t.numpy() for t in (loss, dh, dw))))  # by value: the process exits next
    dist.destroy_process_group()


def test_vocab_parallel_fused_loss_matches_the_single_process_one():
    """Two gloo ranks with 19 and 18 of the 37 words (uneven, as a last shard can be) give the same losses and grads."""
    from tests.distributed.helpers import free_port

    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_vocab_parallel_rank, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = {r: [torch.from_numpy(a) for a in rest] for r, *rest in (queue.get(timeout=120) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
    h, w, t, g = inputs()
    exact = loss_and_grads(reference_linear_cross_entropy, h.double(), w.double(), t, g)
    plain = loss_and_grads(reference_linear_cross_entropy, h, w, t, g)
    for rank, (loss, dh, dw) in results.items():
        rows = slice(rank * 19, (rank + 1) * 19)
        plain_shard, exact_shard = [*plain[:2], plain[2][rows]], [*exact[:2], exact[2][rows]]
        assert_as_accurate([loss, dh, dw], plain_shard, exact_shard, torch.finfo(torch.float32).eps)


MODEL = ModelConfig(vocab_size=96, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, seq_len=24)


def model_run(model, tokens_BL, chunk: int | None):
    """(per-token losses, every gradient) of one training forward; chunk None: an all-float64 loss (the truth)."""
    model.zero_grad(set_to_none=True)
    model.loss_chunk_tokens = chunk or 0
    ctx = RoutingContext(seed=7, step=3, sample_ids=(0, 1, 2, 3))
    if chunk is None:
        out = model(tokens_BL[:, :-1], ctx=ctx)
        loss_BL = F.cross_entropy(out.logits_BLV.transpose(1, 2), tokens_BL[:, 1:], reduction="none")
    else:
        out = model(tokens_BL[:, :-1], tokens_BL[:, 1:], ctx=ctx)
        loss_BL = out.token_loss_BL
        assert (out.logits_BLV is None) == (chunk > 0)
    (loss_BL.mean() + out.aux_loss).backward()
    return loss_BL.detach().double(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("moe", [MoEConfig(), MoEConfig(routing="lory", num_experts=4, segment_length=8)])
def test_a_model_with_the_fused_loss_trains_like_the_plain_one(moe, tied):
    """A float64 model (the loss is fp32 on both paths): losses and every gradient as accurate as the plain path's."""
    cfg = dataclasses.replace(MODEL, tie_embeddings=tied)
    model = build_model(cfg, 0, moe=moe).double().train()
    tokens_BL = torch.randint(0, cfg.vocab_size, (4, cfg.seq_len + 1), generator=torch.Generator().manual_seed(1))
    (exact, exact_grads), (plain, plain_grads), (fused, fused_grads) = (
        model_run(model, tokens_BL, chunk) for chunk in (None, 0, 10)
    )
    assert fused_grads.keys() == plain_grads.keys() == exact_grads.keys()
    names = ["loss", *fused_grads]
    assert_as_accurate(
        [fused, *fused_grads.values()], [plain, *plain_grads.values()], [exact, *exact_grads.values()],
        torch.finfo(torch.float32).eps, names,
    )  # fmt: skip
