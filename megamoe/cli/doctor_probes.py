"""`megamoe doctor`'s kernel self-checks (per rank) and its all-reduce and all-to-all probes (across ranks)."""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

from megamoe.cli.doctor_checks import Check

KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def kernel_checks(device: torch.device, name: str, shapes: list[tuple[int, int, int, int]]) -> list[Check]:
    """The Lory merge self-checks as training would run them, per (E, T, D, F) shape class: on a CPU the fused C
    kernel in fp32; the Triton kernels in fp32 and bf16 where they run (CUDA, or the CPU's interpreter)."""
    from megamoe.ops.lory import _triton_available, _triton_runs_on

    checks = _cpu_kernel_checks(name, shapes) if device.type == "cpu" else []
    if not _triton_runs_on(device):
        return [*checks, Check("kernels", name, "skip", "the Triton kernels are CUDA-only")]
    if not _triton_available():
        status = "fail" if device.type == "cuda" else "skip"
        what = "megamoe_kernels.lory does not import: auto uses the reference"
        return [*checks, Check("kernels", name, status, what)]
    where = str(device) if device.type == "cpu" else f"cuda:{device.index or 0}"
    tf32 = bool(torch.backends.cuda.matmul.allow_tf32)
    keys = [(where, dtype, dtype, torch.float32, tf32, *shape) for shape in shapes for dtype in KERNEL_DTYPES]
    return [*checks, *(_checked(name, key, "triton") for key in keys)]


def _cpu_kernel_checks(name: str, shapes: list[tuple[int, int, int, int]]) -> list[Check]:
    """The fused CPU kernel's self-check per shape class (fp32), or why auto uses the reference merge instead."""
    from megamoe.ops import lory_cpu

    why = lory_cpu.unavailable(torch.float32)
    if why is not None:
        return [Check("kernels", name, "warn", f"{why}: auto uses the reference merge (correct, slower)")]
    fp32 = torch.float32
    return [_checked(name, ("cpu", fp32, fp32, fp32, False, *shape), "cpu") for shape in shapes]


def _checked(name: str, key: tuple, impl: str) -> Check:
    """One self-check line: (device, dtype, x dtype, weight dtype, tf32, E, T, D, F) for impl's kernels."""
    from megamoe.ops.lory_check import FUSED, CheckKey, class_size, self_check, tolerance

    where, dtype, x_dtype, w_dtype, tf32, experts, tokens, width, hidden = key
    sizes = class_size(tokens), class_size(width), class_size(hidden)
    result = self_check(CheckKey(where, dtype, x_dtype, w_dtype, tf32, experts, *sizes, impl))
    label = f"{FUSED[impl]} {result.key.describe()}"
    if not result.ok:
        return Check("kernels", name, "fail", f"{label}: {result.failure}")
    bound = tolerance(dtype, where.split(":")[0])
    what = f"max error {max(result.errors.values()):.1e} (bound {bound:.0e}), {result.seconds:.2f} s"
    return Check("kernels", name, "ok", f"{label}: {what}")


def init_world(timeout_s: float) -> torch.device:
    """Join torchrun's world (nccl on GPUs, gloo on CPUs) and return this rank's device."""
    import datetime

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return device


def _timed(op, device: torch.device, rounds: int) -> float:
    """Seconds per call of op, the slowest rank's (all ranks start together after a barrier)."""
    dist.barrier()
    start = time.perf_counter()
    for _ in range(rounds):
        op()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = torch.tensor([(time.perf_counter() - start) / rounds], device=device)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item()


def _bandwidth(nbytes: int, seconds: float, factor: float) -> str:
    """Bus and algorithm bandwidth as nccl-tests define them (bus = algorithm × factor)."""
    algbw = nbytes / seconds / 1e9
    return f"{algbw * factor:.2f} GB/s bus ({algbw:.2f} algorithm), {seconds * 1e3:.1f} ms"


def all_reduce_probe(device: torch.device, mib: float, rounds: int) -> Check:
    """Sum of (rank + 1) over the ranks: checked exactly, then timed (bus factor 2(n − 1)/n)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    numel = int(mib * 2**20) // 4
    buf = torch.full((numel,), float(rank + 1), device=device)
    dist.all_reduce(buf)
    want = world * (world + 1) / 2
    correct = bool((buf == want).all())
    flag = torch.tensor([0 if correct else 1], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    seconds = _timed(lambda: dist.all_reduce(buf), device, rounds)
    what = f"{mib:g} MiB fp32: {_bandwidth(numel * 4, seconds, 2 * (world - 1) / world)}"
    if flag.item():
        return Check("collectives", "all-reduce", "fail", f"{what}, WRONG sums on some rank")
    return Check("collectives", "all-reduce", "ok", f"{what}, sums exact")


def all_to_all_probe(device: torch.device, mib: float, rounds: int) -> Check:
    """all_to_all_single of equal chunks, chunk j of rank r = r·n + j: checked exactly, then timed (bus (n − 1)/n)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    chunk = max(1, int(mib * 2**20) // 4 // world)
    send = torch.arange(world, device=device, dtype=torch.float32).add(rank * world).repeat_interleave(chunk)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send)
    want = (torch.arange(world, device=device, dtype=torch.float32) * world + rank).repeat_interleave(chunk)
    flag = torch.tensor([0 if torch.equal(recv, want) else 1], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    seconds = _timed(lambda: dist.all_to_all_single(recv, send), device, rounds)
    what = f"{chunk * world * 4 / 2**20:g} MiB fp32: {_bandwidth(chunk * world * 4, seconds, (world - 1) / world)}"
    if flag.item():
        return Check("collectives", "all-to-all", "fail", f"{what}, WRONG chunks on some rank")
    return Check("collectives", "all-to-all", "ok", f"{what}, chunks exact")
