"""Lory's merged SwiGLU on CPU, fused (megamoe/ops/lory_cpu.c): merged weights and their gradients only
ever exist as cache-sized tiles, where the reference path writes and re-reads them whole.

The C source is compiled once per machine (`cc -O3 -march=native -fopenmp`, about two seconds) into a
cache directory keyed by the source, the compiler and the CPU's flags, and loaded with ctypes. Its small
GEMMs call the BLAS gemm that libtorch exports (MKL on x86). fp32 and fp64; anything else (bf16
autocast, CUDA) takes the reference path. Where no compiler or gemm is found, `unavailable` says why and
`auto` falls back to the reference path. `megamoe.ops.reference.merged_swiglu_loop` is the oracle.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from megamoe.utils.host import cpu_flags

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("lory_cpu.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC")
BUILD_TIMEOUT_S = 120
TMP_PREFIX = "building-"
TILE_COLUMNS = 176
"""Widest F tile; tiles are then made a multiple of the workers per segment group (they split the tiles).
AMD EPYC Zen 3, 2 threads, E = 8, D 256, F 704, fwd+bwd: 88–176 columns fastest at T = 64 and T = 256, 16
about 20% slower, 352 (one tile per thread) 10% slower (docs/kernels.md)."""
BLOCK_BYTES = 8 * 2**20
"""The merged-weight gradients of one block of segments (three tiles per segment, per worker): one fold GEMM
per block and matrix puts them on the experts. Same machine: 1–16 MiB within the noise, 0.25 MiB 15% slower;
at 4–16 threads (CPU work on 2 cores) 2–8 MiB within the noise too (docs/kernels.md)."""
_GEMM = {torch.float32: "sgemm_", torch.float64: "dgemm_"}


class Dims(ctypes.Structure):
    """dims_t in lory_cpu.c."""

    _fields_ = [(name, ctypes.c_int) for name in ("S", "T", "D", "F", "E", "ft", "sb", "threads", "groups")]


def cache_dir() -> Path:
    """Where built kernels live: $MEGAMOE_KERNEL_CACHE, else $XDG_CACHE_HOME (or ~/.cache)/megamoe/kernels."""
    if os.environ.get("MEGAMOE_KERNEL_CACHE"):
        return Path(os.environ["MEGAMOE_KERNEL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "megamoe" / "kernels"


def _compiler() -> str:
    """$CC, else cc."""
    return os.environ.get("CC", "cc")


def _build_key(real: str) -> str:
    """Source, compiler version, flags and CPU flags: a kernel built for another CPU is never loaded."""
    version = subprocess.run([_compiler(), "--version"], capture_output=True, text=True, timeout=30).stdout
    machine = " ".join(sorted(cpu_flags() or [platform.processor()]))
    parts = [SOURCE.read_text(), version, " ".join(FLAGS), real, machine]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _build(real: str) -> Path:
    """The shared library for REAL (float or double), compiled unless already cached; atomic under races."""
    target = cache_dir() / f"lory_cpu_{real}_{_build_key(real)}.so"
    _remove_stale(target.parent)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [_compiler(), *FLAGS, f"-DREAL={real}", str(SOURCE), "-o", tmp, "-lmvec"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if done.returncode:
            raise OSError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def _remove_stale(folder: Path) -> None:
    """Delete unfinished builds of killed processes (older than twice the build timeout, so none still running)."""
    for stale in folder.glob(f"{TMP_PREFIX}*.so"):
        try:
            if time.time() - stale.stat().st_mtime > 2 * BUILD_TIMEOUT_S:
                stale.unlink()
        except FileNotFoundError:
            pass  # another process removed it first


class Kernels:
    """The loaded library of one dtype and libtorch's gemm for it."""

    def __init__(self, dtype: torch.dtype):
        real = "float" if dtype == torch.float32 else "double"
        self.lib = ctypes.CDLL(str(_build(real)))
        torch_cpu = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        self.gemm = ctypes.cast(getattr(torch_cpu, _GEMM[dtype]), ctypes.c_void_p)
        ptr = ctypes.c_void_p
        self.lib.lory_scratch.argtypes, self.lib.lory_scratch.restype = [Dims], ctypes.c_long
        self.lib.lory_forward.argtypes = [ptr, Dims, *[ptr] * 8]
        self.lib.lory_backward.argtypes = [ptr, Dims, *[ptr] * 14]


@functools.cache
def _load(dtype: torch.dtype) -> Kernels | str:
    """The kernels for dtype, or why they are unavailable (logged once)."""
    if dtype not in _GEMM:
        return f"no fused CPU kernel for {dtype}"
    try:
        return Kernels(dtype)
    except (OSError, AttributeError, subprocess.SubprocessError) as err:
        log.warning("lory: the fused CPU kernel is unavailable, the reference path runs instead: %s", err)
        return f"the fused CPU kernel could not be built or loaded: {err}"


def unavailable(dtype: torch.dtype = torch.float32) -> str | None:
    """None when the fused kernel runs for dtype here, else why not."""
    kernels = _load(dtype)
    return kernels if isinstance(kernels, str) else None


def supports(x_STD: torch.Tensor, *tensors: torch.Tensor) -> bool:
    """The fused kernel serves these inputs: CPU, one dtype it is built for, no autocast, some segments."""
    dtype = x_STD.dtype
    same = all(t.device.type == "cpu" and t.dtype == dtype for t in (x_STD, *tensors))
    return same and x_STD.shape[0] > 0 and not torch.is_autocast_enabled("cpu") and unavailable(dtype) is None


def tiling(
    segments: int, dim: int, hidden: int, element: int, threads: int, columns: int | None = None
) -> tuple[int, int, int]:
    """(F columns per tile, segments per block, segment groups): columns as given (the forward's, which fix the
    layout of the saved pre-activations, kept in backward whatever the thread count is then), else tiles of at
    most TILE_COLUMNS, as many as a multiple of the workers per group; a worker's P block within BLOCK_BYTES."""
    tiles = _ceil(hidden, columns or TILE_COLUMNS)
    groups = segment_groups(threads, tiles, segments)
    if columns is None:
        per = threads // groups
        columns = min(hidden, _ceil(hidden, _ceil(tiles, per) * per))
    return columns, max(1, min(_ceil(segments, groups), BLOCK_BYTES // (3 * columns * dim * element))), groups


def segment_groups(threads: int, tiles: int, segments: int) -> int:
    """Groups of segments the threads split into (groups × workers = threads, groups ≤ segments): as many
    workers per group as there are tiles of at most TILE_COLUMNS, so tiles stay wide and each segment's
    output is summed over that many partial buffers, not over every thread."""
    sizes = [per for per in range(1, threads + 1) if threads % per == 0 and threads // per <= segments]
    within = [per for per in sizes if per <= tiles]
    return threads // (max(within) if within else min(sizes))


def _dims(
    segments: int, seg_len: int, dim: int, hidden: int, experts: int, element: int, columns: int | None = None
) -> Dims:
    """The kernel's shape record at this thread count (columns: see tiling)."""
    threads = torch.get_num_threads()
    columns, block, groups = tiling(segments, dim, hidden, element, threads, columns)
    return Dims(segments, seg_len, dim, hidden, experts, columns, block, threads, groups)


def _tiles(dims: Dims) -> int:
    """F tiles of a call."""
    return _ceil(dims.F, dims.ft)


def _ceil(a: int, b: int) -> int:
    """⌈a / b⌉."""
    return -(-a // b)


def workspace_bytes(segments: int, seg_len: int, dim: int, hidden: int, experts: int, element: int) -> int | None:
    """Memory a call holds besides what it saves and returns, at its peak (backward): every worker's
    scratch, the transposed down experts, the three expert gradients of every segment group and the per-tile
    dw shares.
    None where the kernel would not run (no kernel for element-byte floats here)."""
    dtype = {4: torch.float32, 8: torch.float64}.get(element)
    kernels = _load(dtype) if dtype is not None else "no kernel"
    if isinstance(kernels, str):
        return None
    dims = _dims(segments, seg_len, dim, hidden, experts, element)
    weights = (3 * dims.groups + 1) * experts * hidden * dim
    return (dims.threads * kernels.lib.lory_scratch(dims) + weights) * element + _tiles(dims) * segments * experts * 8


def _ptr(t: torch.Tensor | None) -> int | None:
    """The data pointer (None for a missing tensor)."""
    return None if t is None else t.data_ptr()


class FusedMergedSwiGLU(torch.autograd.Function):
    """The merged SwiGLU of every segment through the fused kernel; saves what the reference path saves
    (x, the routing weights, the experts, the gate/up pre-activations: here one (S, T, 2F) tensor, per F
    tile its gate columns then its up columns)."""

    @staticmethod
    def forward(ctx, x_STD, w_SE, w_gate_EFD, w_up_EFD, w_down_EDF):
        x_STD, w_SE, *weights = (t.contiguous() for t in (x_STD, w_SE, w_gate_EFD, w_up_EFD, w_down_EDF))
        experts, hidden = w_gate_EFD.shape[:2]
        kernels, dims = _load(x_STD.dtype), _dims(*x_STD.shape, hidden, experts, x_STD.element_size())
        gu_ST2F, y_STD = x_STD.new_empty(*x_STD.shape[:2], 2 * dims.F), torch.empty_like(x_STD)
        scratch = x_STD.new_empty(dims.threads * kernels.lib.lory_scratch(dims))
        tensors = (x_STD, w_SE, *_kernel_layout(weights), gu_ST2F, y_STD, scratch)
        kernels.lib.lory_forward(kernels.gemm, dims, *[t.data_ptr() for t in tensors])
        ctx.save_for_backward(x_STD, w_SE, *weights, gu_ST2F)
        ctx.columns = dims.ft
        return y_STD

    @staticmethod
    def backward(ctx, dy_STD):
        x_STD, w_SE, *weights, gu_ST2F = ctx.saved_tensors
        experts, hidden = weights[0].shape[:2]
        kernels = _load(x_STD.dtype)
        dims = _dims(*x_STD.shape, hidden, experts, x_STD.element_size(), ctx.columns)
        dx_STD = torch.empty_like(x_STD) if ctx.needs_input_grad[0] else None
        dot_NSE = torch.zeros(_tiles(dims), *w_SE.shape, dtype=torch.float64)
        # empty: the kernel's first block of segments overwrites every expert gradient (beta 0)
        grads = [torch.empty_like(w) for w in weights[:2]] + [weights[2].new_empty(weights[1].shape)]
        # the other segment groups' expert gradients, added to these at the end (first blocks overwrite too)
        others = x_STD.new_empty(3 * (dims.groups - 1) * weights[0].numel()) if dims.groups > 1 else None
        scratch = x_STD.new_empty(dims.threads * kernels.lib.lory_scratch(dims))
        dy_STD = dy_STD.to(x_STD.dtype).contiguous()
        tensors = (x_STD, w_SE, *_kernel_layout(weights), gu_ST2F, dy_STD, dx_STD, dot_NSE, *grads, others, scratch)
        kernels.lib.lory_backward(kernels.gemm, dims, *[_ptr(t) for t in tensors])
        dw_SE = dot_NSE.sum(0).to(w_SE.dtype) if ctx.needs_input_grad[1] else None
        return dx_STD, dw_SE, grads[0], grads[1], grads[2].transpose(1, 2).contiguous()


def _kernel_layout(weights: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """gate, up and down as the kernel reads them: all (E, F, D), down transposed (a copy, alive during the call)."""
    return weights[0], weights[1], weights[2].transpose(1, 2).contiguous()


def merged_swiglu_fused(x_STD, w_SE, w_gate_EFD, w_up_EFD, w_down_EDF) -> torch.Tensor:
    """y_STD for every segment (the caller checked `supports`)."""
    return FusedMergedSwiGLU.apply(x_STD, w_SE, w_gate_EFD, w_up_EFD, w_down_EDF)
