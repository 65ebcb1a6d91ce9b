"""Our token-choice MoE layer against megatron-core's MoELayer and DeepSpeed-MoE at the same shapes.

Usage: python -m bench.peer_moe_layers [--tokens 16384] [--dim 1024] [--hidden 2816] [--experts 8] [--top-k 2]
       [--dtype bf16] [--tiny]
Forward+backward median time of one layer on one device, for dropless routing and for capacity
1.25 (each peer's own capacity semantics), with ratios to ours measured in the same run.
- ours: megamoe MoEFFN (grouped GEMM on CUDA when torch has it).
- megatron-core: MoELayer from the local GPT layer spec (TE grouped GEMM if Transformer Engine is
  importable, else SequentialMLP), allgather dispatcher on one rank. Its router needs CUDA.
- DeepSpeed-MoE: deepspeed.moe.layer.MoE around a SwiGLU expert (GShard-style gating). Its "dropless"
  is drop_tokens=False: the capacity is raised to the largest expert load, so it still pads.
A peer that is not installed, or cannot run here, is reported as skipped with the reason. Each
measurement runs in its own process (the peers set process-wide state).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

from bench.lory_merge import DTYPES, median_ms


class SwiGLUExpert(torch.nn.Module):
    """The expert every framework runs: SwiGLU without biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = torch.nn.Linear(dim, hidden, bias=False)
        self.up = torch.nn.Linear(dim, hidden, bias=False)
        self.down = torch.nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


def init_dist() -> None:
    """A one-rank process group (and megatron-core's parallel state) for the peers."""
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29531")
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=0, world_size=1)


def ours(args, capacity: float, device: str):
    """megamoe's MoEFFN; call(x_LBD) → output."""
    from megamoe.config import ModelConfig, load_config
    from megamoe.model.factory import LayerFactory
    from megamoe.model.init import init_parameters
    from megamoe.model.moe import MoEFFN

    model = ModelConfig(d_model=args.dim, num_heads=8, seq_len=args.seq_len, vocab_size=64, ffn_hidden_size=args.hidden)
    cfg = load_config(None, ["moe.routing=topk", f"moe.num_experts={args.experts}", f"moe.top_k={args.top_k}",
                             f"moe.capacity_factor={capacity}", f"moe.eval_capacity_factor={capacity}",
                             "moe.z_loss_coef=0", "moe.balance_loss_coef=0.01"]).moe  # fmt: skip
    layer = MoEFFN(model, cfg, LayerFactory())
    init_parameters(layer, model, 0)
    return layer.to(device), lambda m, x: m(x)[0]


def deepspeed_moe(args, capacity: float, device: str):
    """DeepSpeed-MoE's layer; inputs (B, L, D)."""
    from deepspeed.moe.layer import MoE

    init_dist()
    layer = MoE(hidden_size=args.dim, expert=SwiGLUExpert(args.dim, args.hidden), num_experts=args.experts, ep_size=1,
                k=args.top_k, capacity_factor=capacity or 1.0, eval_capacity_factor=capacity or 1.0, min_capacity=4,
                drop_tokens=capacity > 0)  # fmt: skip
    return layer.to(device), lambda m, x: m(x.transpose(0, 1))[0].transpose(0, 1)


def megatron_moe(args, capacity: float, device: str):
    """megatron-core's MoELayer (one rank); inputs (L, B, D)."""
    if device != "cuda":
        raise RuntimeError("megatron-core's MoE router needs CUDA (gating calls torch.cuda.current_device)")
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.transformer_config import TransformerConfig

    init_dist()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=1)
    grouped = _has_te()
    cfg = TransformerConfig(
        num_layers=1, hidden_size=args.dim, num_attention_heads=8, ffn_hidden_size=args.hidden,
        num_moe_experts=args.experts, moe_router_topk=args.top_k, moe_token_dispatcher_type="allgather",
        moe_expert_capacity_factor=capacity or None, moe_pad_expert_input_to_capacity=capacity > 0,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, moe_grouped_gemm=grouped,
        moe_aux_loss_coeff=0.01, bf16=args.dtype == "bf16", params_dtype=DTYPES[args.dtype],
    )  # fmt: skip
    spec = get_gpt_layer_local_spec(num_experts=args.experts, moe_grouped_gemm=grouped)
    layer = MoELayer(cfg, submodules=spec.submodules.mlp.submodules)
    return layer.to(device), lambda m, x: m(x)[0]


def _has_te() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


PEERS = {"megamoe": ours, "megatron-core MoELayer": megatron_moe, "DeepSpeed-MoE": deepspeed_moe}


def measure(build, args, capacity: float, device: str) -> float:
    """Median fwd+bwd milliseconds over 3 rotating random inputs."""
    module, call = build(args, capacity, device)
    module = module.to(DTYPES[args.dtype]).train()
    batch = args.tokens // args.seq_len
    inputs = [torch.randn(args.seq_len, batch, args.dim, device=device, dtype=DTYPES[args.dtype]) for _ in range(3)]
    turn = [0]

    def step():
        turn[0] += 1
        x = inputs[turn[0] % 3].requires_grad_()
        call(module, x).float().square().mean().backward()
        module.zero_grad(set_to_none=True)

    return median_ms(step, device, args.repeats)


def one(args) -> None:
    """Measure one (peer, capacity) in this process and print its result as JSON."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        result = {"ms": measure(PEERS[args.only], args, args.capacity, device)}
    except (ImportError, RuntimeError, AssertionError) as err:
        result = {"skipped": f"{type(err).__name__}: {str(err).splitlines()[0][:90]}"}
    print("RESULT " + json.dumps(result))


def run_isolated(argv: list[str], peer: str, capacity: float) -> dict:
    """One measurement in a fresh process: the peers set process-wide state (DeepSpeed's
    accelerator and comm setup, megatron-core's parallel state) that must not leak into the others."""
    cmd = [sys.executable, "-m", "bench.peer_moe_layers", *argv, "--only", peer, "--capacity", str(capacity)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        return {"skipped": f"crashed (exit {out.returncode}): {out.stderr.strip().splitlines()[-1][:90]}"}
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    """Print the comparison table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=2816)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke shapes: 256 tokens, d 32, f 64, fp32")
    parser.add_argument("--only", choices=list(PEERS), help=argparse.SUPPRESS)
    parser.add_argument("--capacity", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tiny:
        args.tokens, args.seq_len, args.dim, args.hidden, args.dtype, args.repeats = 256, 64, 32, 64, "fp32", 2
    if args.only:
        return one(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}, {args.dtype}; {args.tokens} tokens, D {args.dim}, F {args.hidden}, "
          f"E {args.experts}, top-{args.top_k}\n")  # fmt: skip
    print("| routing | layer | fwd+bwd ms | tokens/s | × ours (time) |")
    print("|---|---|---|---|---|")
    argv = [a for a in sys.argv[1:] if a not in ("--only", "--capacity")]
    for label, capacity in (("dropless", 0.0), ("capacity 1.25", 1.25)):
        base = None
        for peer in PEERS:
            result = run_isolated(argv, peer, capacity)
            if "skipped" in result:
                print(f"| {label} | {peer} | skipped: {result['skipped']} | | |")
                continue
            ms = result["ms"]
            base = base or ms
            print(f"| {label} | {peer} | {ms:.2f} | {args.tokens / ms * 1e3:,.0f} | {ms / base:.2f} |")


if __name__ == "__main__":
    main()
