"""`megamoe doctor`: check a node before a long job; exit 0 only when every check passed.

Prints the stack, the devices, the Lory merge kernels' self-checks, a matmul probe against the
device's peak and, under torchrun, all-reduce and all-to-all probes across the ranks.
"""

from __future__ import annotations

import argparse
import os
import socket
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported when the command runs: `megamoe data …` and `--help` do not pay for it
    import torch

DEFAULT_SHAPES = [(8, 256, 1024, 2816), (16, 256, 1024, 2816), (32, 256, 1024, 2816)]
"""Lory 0.3B's layer (D 1024, F 2816, T 256) at 8, 16 and 32 experts: the kernels' target shapes (docs/kernels.md)."""

SECTIONS = ("stack", "devices", "kernels", "matmul", "collectives")


def _shape(text: str) -> tuple[int, int, int, int]:
    """E,T,D,F as four positive integers."""
    parts = text.split(",")
    if len(parts) != 4 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected E,T,D,F (four positive integers), got {text!r}")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    p = sub.add_parser("doctor", help="check a node (stack, devices, kernels, matmul, collectives) before a long job")
    p.add_argument(
        "--shape", action="append", type=_shape, metavar="E,T,D,F",
        help="Lory layer shape class to self-check the kernels at (repeatable; default 8/16/32,256,1024,2816)",
    )  # fmt: skip
    p.add_argument("--matmul-size", type=int, default=None, help="matmul edge (default 8192 on a GPU, 1024 on a CPU)")
    p.add_argument("--seconds", type=float, default=1.0, help="time spent timing the matmul (default 1)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="the device's peak (default: the vendor table)")
    p.add_argument(
        "--min-peak-fraction", type=float, default=0.25,
        help="fail when the matmul reaches less than this share of the peak (default 0.25)",
    )  # fmt: skip
    p.add_argument("--comm-mib", type=float, default=None, help="message MiB (default 64 on GPUs, 4 on CPUs)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds before a collective counts as hung")
    p.set_defaults(func=run)


def _local_checks(args: argparse.Namespace, device: torch.device, name: str) -> list:
    """Everything this rank checks by itself."""
    from megamoe.cli.doctor_checks import device_check, matmul_probe, stack
    from megamoe.cli.doctor_probes import kernel_checks

    size = args.matmul_size or (8192 if device.type == "cuda" else 1024)
    return [
        *stack(),
        device_check(device, name),
        *kernel_checks(device, name, args.shape or DEFAULT_SHAPES),
        matmul_probe(device, name, size, args.seconds, args.peak_tflops, args.min_peak_fraction),
    ]


def _world_checks(args: argparse.Namespace, device: torch.device, local: list) -> list[list]:
    """Every rank's local checks (gathered) with the collective probes and the stack's agreement appended."""
    import torch.distributed as dist

    from megamoe.cli.doctor_checks import Check
    from megamoe.cli.doctor_probes import all_reduce_probe, all_to_all_probe

    mib = args.comm_mib or (64.0 if device.type == "cuda" else 4.0)
    rounds = 10 if device.type == "cuda" else 3
    local = [*local, all_reduce_probe(device, mib, rounds), all_to_all_probe(device, mib, rounds)]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    stacks = [[(c.name, c.detail) for c in checks if c.section == "stack"] for checks in gathered]
    differ = [r for r, s in enumerate(stacks) if s != stacks[0]]
    backend = dist.get_backend()
    agree = Check("stack", "same on all ranks", "fail" if differ else "ok", f"ranks {differ} differ from rank 0")
    if not differ:
        agree.detail = f"{len(gathered)} ranks ({backend})"
    gathered[0] = [*gathered[0], agree]
    return gathered


def _report(per_rank: list[list]) -> int:
    """Print every section (stack and collectives once, the rest per rank); 0 when nothing failed."""
    print("megamoe doctor")
    for section in SECTIONS:
        lines = [c for r, checks in enumerate(per_rank) for c in checks if c.section == section]
        if section in ("stack", "collectives"):
            lines = [c for c in per_rank[0] if c.section == section]
        if lines:
            print(section)
        for c in lines:
            print(f"  {c.status:<5} {c.name:<18} {c.detail}")
    failed = [c for checks in per_rank for c in checks if c.status == "fail"]
    total = sum(len(checks) for checks in per_rank)
    if failed:
        print(f"doctor: {len(failed)} of {total} checks FAILED: " + "; ".join(f"{c.section} {c.name}" for c in failed))
        return 1
    print(f"doctor: all {total} checks passed")
    return 0


def run(args: argparse.Namespace) -> int:
    """Run the checks on this process (and across torchrun's ranks); rank 0 prints the report."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        return _report([_local_checks(args, device, str(device))])
    import torch.distributed as dist

    from megamoe.cli.doctor_probes import init_world

    device = init_world(args.timeout)
    name = f"rank {dist.get_rank()} {socket.gethostname()} {device}"
    try:
        per_rank = _world_checks(args, device, _local_checks(args, device, name))
        if dist.get_rank() == 0:
            return _report(per_rank)
        return int(any(c.status == "fail" for checks in per_rank for c in checks))
    finally:
        dist.destroy_process_group()
