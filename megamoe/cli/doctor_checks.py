"""The checks `megamoe doctor` runs on one rank: the stack, the device, the kernels' self-checks, a matmul probe."""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import importlib.util
import os
import platform
import time
from dataclasses import dataclass

import torch

from megamoe.utils.host import describe_cpu, native_bf16

MATMUL_CORRECT = 1e-2
"""Relative error of a bf16 matmul (fp32 accumulation, bf16 output: ~2e-3) or an fp32 one, against fp32/fp64."""


@dataclass
class Check:
    """One line of the report: its section, what was checked, ok | warn | fail | skip, and what was found."""

    section: str
    name: str
    status: str
    detail: str


def _version(*dists: str) -> str | None:
    """The installed version of the first distribution present, else None."""
    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def _import_error(module: str) -> str | None:
    """None when module imports, else the exception's first line."""
    try:
        importlib.import_module(module)
    except Exception as err:  # any import failure is the finding
        return f"import {module}: {type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    return None


def _package(name: str, dists: tuple[str, ...], module: str, required: bool) -> Check:
    """A package's version and whether it imports (absent: fail when required, else skip)."""
    version = _version(*dists)
    if version is None:
        note = "not installed" if required else "not installed (optional)"
        return Check("stack", name, "fail" if required else "skip", note)
    error = _import_error(module)
    return Check("stack", name, "fail" if error else "ok", f"{version}; {error}" if error else version)


def _gpu_node() -> bool:
    """The node has an NVIDIA driver (whether or not this torch can use it)."""
    return os.path.exists("/dev/nvidiactl")


def _nccl_version() -> str:
    """NCCL's version as torch reports it (a tuple in recent torch, an int in older ones)."""
    version = torch.cuda.nccl.version()
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def _cuda() -> list[Check]:
    """torch's CUDA build, the devices it sees, and NCCL (a node with an NVIDIA driver must use its GPUs)."""
    no_nccl = Check("stack", "NCCL", "skip", "no CUDA")
    if torch.version.cuda is None:
        fix = ": this node has an NVIDIA driver; install a CUDA build of torch" if _gpu_node() else ""
        return [Check("stack", "CUDA", "fail" if _gpu_node() else "ok", f"CPU build of torch{fix}"), no_nccl]
    if not torch.cuda.is_available():
        why = " (driver? CUDA_VISIBLE_DEVICES?)" if _gpu_node() else " (no NVIDIA driver on this node)"
        status = "fail" if _gpu_node() else "ok"
        return [Check("stack", "CUDA", status, f"torch built with CUDA {torch.version.cuda} sees no GPU{why}"), no_nccl]
    cuda = f"{torch.version.cuda}, driver sees {torch.cuda.device_count()} device(s)"
    nccl = _nccl_version() if torch.distributed.is_nccl_available() else None
    return [Check("stack", "CUDA", "ok", cuda), Check("stack", "NCCL", "ok" if nccl else "fail", nccl or "not built")]


def _apex() -> Check:
    """NVIDIA apex when present; PyPI's unrelated `apex` breaks megatron-core's LayerNorm import."""
    version = _version("apex")
    if version is None:
        return Check("stack", "apex", "skip", "not installed (optional)")
    if importlib.util.find_spec("apex.normalization") is None:
        return Check("stack", "apex", "fail", f"{version} is PyPI's unrelated `apex`: pip uninstall apex")
    return Check("stack", "apex", "ok", version)


def _faiss() -> Check:
    """faiss's version and whether it has GPU support (faiss-gpu) on a node with GPUs."""
    version = _version("faiss-cpu", "faiss-gpu-cu12", "faiss-gpu", "faiss")
    if version is None or _import_error("faiss"):
        return Check("stack", "faiss", "fail", "not installed or not importable (similarity ordering needs it)")
    import faiss

    gpus = faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else None
    if gpus is None:
        status = "warn" if torch.cuda.is_available() else "ok"
        return Check("stack", "faiss", status, f"{version}, CPU only (kNN for similarity ordering on the CPU)")
    return Check("stack", "faiss", "ok", f"{version}, GPU support, {gpus} GPU(s)")


def stack() -> list[Check]:
    """Versions of the whole stack; required parts must import."""
    checks = [
        Check("stack", "python", "ok", platform.python_version()),
        Check("stack", "torch", "ok", torch.__version__),
        *_cuda(),
        _package("Triton", ("triton",), "megamoe_kernels.lory", required=torch.cuda.is_available()),
        _package("megatron-core", ("megatron-core", "megatron_core"), "megatron.core", required=True),
        _package("DeepSpeed", ("deepspeed",), "deepspeed", required=True),
        _apex(),
        _package("TransformerEngine", ("transformer-engine", "transformer_engine"), "transformer_engine", False),
        _faiss(),
    ]
    return checks


def device_check(device: torch.device, name: str) -> Check:
    """What the device is: GPU name, memory and compute capability, or the CPU and its kernel family."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        what = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}"
        return Check("devices", name, "ok", what)
    native = native_bf16()
    bf16 = "unknown" if native is None else ", ".join(native) or "none (bf16 autocast is emulated, slow)"
    return Check("devices", name, "ok", f"{describe_cpu()}, native bf16: {bf16}")


def _sync(device: torch.device) -> None:
    """Wait for the device's queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_tflops(a: torch.Tensor, b: torch.Tensor, seconds: float) -> float:
    """Best TFLOP/s of a @ b over five rounds of about seconds/5 each (a peak, as MFU's is)."""
    flop, best = 2 * a.shape[0] * a.shape[1] * b.shape[1], 0.0
    for _ in range(5):
        _sync(a.device)
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 5:
            a @ b
            count += 1
            if a.device.type == "cuda" and count % 8 == 0:
                _sync(a.device)
        _sync(a.device)
        best = max(best, flop * count / (time.perf_counter() - start) / 1e12)
    return best


def matmul_probe(device: torch.device, name: str, size: int, seconds: float, peak: float, min_fraction: float) -> Check:
    """A large matmul's TFLOP/s (bf16 on a GPU, fp32 on a CPU), checked for correctness and against the peak."""
    from megamoe.train.flops import peak_tflops

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device, dtype)
    b = torch.randn(size, size, generator=gen).to(device, dtype)
    rows = min(size, 128)
    got, want = (a[:rows] @ b).double(), a[:rows].double() @ b.double()
    err = ((got - want).norm() / want.norm()).item()
    tflops = _best_tflops(a, b, seconds)
    what = f"{str(dtype).removeprefix('torch.')} {size}³: {tflops:.2f} TFLOP/s"
    if not err < MATMUL_CORRECT:
        return Check("matmul", name, "fail", f"{what}, WRONG result (relative error {err:.1e})")
    if device.type != "cuda":
        return Check("matmul", name, "ok", f"{what} (a CPU has no vendor peak; MFU measures one at start)")
    peak, source = peak_tflops(device, peak)
    if peak <= 0:
        return Check("matmul", name, "warn", f"{what}; {source} (or pass --peak-tflops)")
    status = "ok" if tflops >= min_fraction * peak else "fail"
    share = f"{tflops / peak:.0%} of {peak:.0f} ({source}; floor {min_fraction:.0%})"
    return Check("matmul", name, status, f"{what} = {share}")
