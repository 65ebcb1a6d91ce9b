"""Self-check of the fused Lory merge before it serves a (device, dtype, shape class).

Shape legend: S segments, T tokens per segment, D width, F FFN width, E experts.

The first time `moe.merge_impl` auto, triton or cpu picks fused kernels (Triton's, or the C
kernel of megamoe.ops.lory_cpu) for a device, dtype and shape class, the kernels compile and run on
a small case of that class (three segments, the same E, each of T, D, F cut to at most 128 + its
remainder mod 64, so the block sizes, the masked tails and Triton's divisible-by-16
specializations are the real run's). Output and all five gradients are compared with the float64
loop (`merged_swiglu_loop`) by ‖got − ref‖ / ‖ref‖, at the bounds of tests/kernels: fp32 < 1e-5 on
the CPU, < 5e-4 on a GPU (TF32 may be on); other dtypes < 2e-2; every dtype no worse than 1.5×
(+1e-3) the reference path's error on the same inputs. A failure (an exception at compile or run, a
wrong or non-finite value) makes auto fall back to the reference with one warning, and an explicit
triton or cpu stop with an error. Results are cached per process; the inputs come from a private
generator, so the global RNG stream is untouched.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from megamoe.errors import MegamoeError
from megamoe.ops import lory_cpu
from megamoe.ops.lory import merged_swiglu_reference, resolve_merge_impl
from megamoe.ops.reference import merged_swiglu_loop

log = logging.getLogger(__name__)

CHECK_SEGMENTS = 3
"""Segments in the small case: more than one, so the weight-gradient kernel's segment loop runs."""

FUSED = {"triton": "Triton", "cpu": "CPU"}
"""The fused paths that check themselves, and their names in messages."""

GRADIENTS = ("y", "dx", "d routing weights", "dw_gate", "dw_up", "dw_down")

REPORT = "report it to the megamoe maintainers with this message and the output of `megamoe doctor`"


def tolerance(dtype: torch.dtype, device_type: str) -> float:
    """Relative-error bound: IEEE fp32 in the interpreter, TF32 possible on a GPU, bf16 (or fp16) operands."""
    if dtype == torch.float32:
        return 1e-5 if device_type == "cpu" else 5e-4
    return 2e-2


def relative_bound(reference_error: float) -> float:
    """The fused path may be no worse than 1.5× the reference path's own error (+1e-3)."""
    return 1.5 * reference_error + 1e-3


def class_size(size: int) -> int:
    """A small size of the same class: ≤ 128 kept, else 128 + size mod 64 (same blocks, tails, % 16)."""
    return size if size <= 128 else 128 + size % 64


@dataclass(frozen=True)
class CheckKey:
    """What a self-check result holds for: device, dtypes, TF32, and the shape class."""

    device: str
    dtype: torch.dtype
    x_dtype: torch.dtype
    weight_dtype: torch.dtype
    tf32: bool
    experts: int
    tokens: int
    width: int
    hidden: int
    impl: str = "triton"

    def describe(self) -> str:
        """e.g. `cuda:0 bf16 (E=8 T=128 D=128 F=128 class)`."""
        name = str(self.dtype).removeprefix("torch.")
        return f"{self.device} {name} (E={self.experts} T={self.tokens} D={self.width} F={self.hidden} class)"


@dataclass
class CheckResult:
    """Errors per output/gradient, the first failure (None: passed) and the wall time."""

    key: CheckKey
    failure: str | None
    seconds: float
    errors: dict[str, float] = field(default_factory=dict)
    warned: bool = False

    @property
    def ok(self) -> bool:
        """True when the kernels compiled, ran and matched."""
        return self.failure is None


_RESULTS: dict[CheckKey, CheckResult] = {}


def compute_dtype(device: torch.device, x_dtype: torch.dtype) -> torch.dtype:
    """The merge's matmul dtype: autocast's when it is on, else x's."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return x_dtype


def check_key(x_STD: torch.Tensor, w_gate_EFD: torch.Tensor, impl: str = "triton") -> CheckKey:
    """The key of a real call: its device, dtypes and shape class, for the fused kernels impl names."""
    device = x_STD.device
    experts, hidden, width = w_gate_EFD.shape
    name = str(device) if device.index is not None or device.type == "cpu" else f"cuda:{torch.cuda.current_device()}"
    return CheckKey(
        name, compute_dtype(device, x_STD.dtype), x_STD.dtype, w_gate_EFD.dtype,
        bool(torch.backends.cuda.matmul.allow_tf32), experts,
        class_size(x_STD.shape[1]), class_size(width), class_size(hidden), impl,
    )  # fmt: skip


def self_check(key: CheckKey) -> CheckResult:
    """The cached result for key, running the check the first time."""
    if key not in _RESULTS:
        _RESULTS[key] = run_check(key)
    return _RESULTS[key]


def select_merge_impl(impl: str, x_STD: torch.Tensor, w_gate_EFD: torch.Tensor) -> str:
    """resolve_merge_impl, then the self-check of the fused kernels it picks: auto falls back, an explicit choice stops.

    `cpu` on inputs its kernel does not serve (bf16 autocast, mixed dtypes) runs the reference without a check."""
    chosen = resolve_merge_impl(impl, x_STD.device)
    if chosen == "cpu" and not lory_cpu.supports(x_STD, w_gate_EFD):
        return "reference"
    if chosen not in FUSED:
        return chosen
    result = self_check(check_key(x_STD, w_gate_EFD, chosen))
    if result.ok:
        return chosen
    what = f"the fused {FUSED[chosen]} merge failed its self-check on {result.key.describe()}: {result.failure}"
    if impl == chosen:
        raise MegamoeError(f"moe.merge_impl: {what}; set moe.merge_impl=auto or reference, and {REPORT}")
    if not result.warned:
        result.warned = True
        log.warning("lory: %s; using the reference merge (correct, slower). Please %s", what, REPORT)
    return "reference"


def _inputs(key: CheckKey) -> list[torch.Tensor]:
    """x, routing weights, gate, up, down of the small case (private generator, on the key's device)."""
    gen = torch.Generator().manual_seed(20)
    seg, e, t, d, f = CHECK_SEGMENTS, key.experts, key.tokens, key.width, key.hidden
    x = torch.randn(seg, t, d, generator=gen).to(key.x_dtype)
    w = torch.randn(seg, e, generator=gen).softmax(-1).to(key.x_dtype)
    gate = torch.randn(e, f, d, generator=gen) / d**0.5
    up = torch.randn(e, f, d, generator=gen) / d**0.5
    down = torch.randn(e, d, f, generator=gen) / f**0.5
    weights = [m.to(key.weight_dtype) for m in (gate, up, down)]
    return [a.to(key.device).requires_grad_() for a in (x, w, *weights)]


def _output_and_grads(fn, args: list[torch.Tensor], cot: torch.Tensor, key: CheckKey) -> list[torch.Tensor]:
    """fn's output and the gradients of ⟨out, cot⟩ for every input, under the key's autocast."""
    device_type = args[0].device.type
    autocast = key.dtype != key.x_dtype
    with torch.autocast(device_type, dtype=key.dtype, enabled=autocast):
        out = fn(*args)
    grads = torch.autograd.grad(out, args, cot.to(out.dtype))
    return [out.detach(), *grads]


def _exact(args: list[torch.Tensor], cot: torch.Tensor) -> list[torch.Tensor]:
    """Output and gradients of the float64 loop (autocast leaves float64 ops alone)."""
    exact_args = [a.detach().double().requires_grad_() for a in args]
    out = merged_swiglu_loop(*exact_args)
    return [out.detach(), *torch.autograd.grad(out, exact_args, cot.double())]


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / ‖want‖ in float64 on the CPU; NaN and inf never pass."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    err = ((got - want).norm() / want.norm()).item()
    return err if err == err else float("inf")


def _compare(key: CheckKey, fused: list, reference: list, exact: list) -> tuple[dict[str, float], str | None]:
    """Errors of the fused path and the first bound it breaks (None: within all)."""
    bound = tolerance(key.dtype, key.device.split(":")[0])
    errors, failure = {}, None
    for name, got, ref, want in zip(GRADIENTS, fused, reference, exact, strict=True):
        err, ref_err = _rel_err(got, want), _rel_err(ref, want)
        errors[name] = err
        if failure is None and not err < bound:
            failure = f"{name} relative error {err:.2e} > {bound:.0e}"
        elif failure is None and not err <= relative_bound(ref_err):
            failure = f"{name} relative error {err:.2e} > 1.5 × the reference's {ref_err:.2e} + 1e-3"
    return errors, failure


def _summary(err: Exception) -> str:
    """An exception's first line, and its last (where Triton's compile errors say what broke), within 300 characters."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [""]
    text = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
    return text if len(text) <= 300 else text[:297] + "..."


def _same(t: torch.Tensor) -> torch.Tensor:
    """The identity saved-tensor hook."""
    return t


def _fused(impl: str):
    """The fused path impl names (imported on use: Triton's only where it runs)."""
    if impl == "cpu":
        return lory_cpu.merged_swiglu_fused
    from megamoe.ops.lory_triton import merged_swiglu_triton

    return merged_swiglu_triton


def run_check(key: CheckKey) -> CheckResult:
    """Compile and run the kernels on the small case and compare with the float64 loop (no cache)."""
    start = time.perf_counter()
    # Identity saved-tensor hooks shadow the caller's (activation checkpointing, memory probes): the check's
    # autograd graph is its own, and a checkpointed forward's recompute (which finds the result cached) agrees.
    with torch.inference_mode(False), torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_same, _same):
        args = _inputs(key)
        cot = torch.randn(args[0].shape, generator=torch.Generator().manual_seed(21)).to(key.device)
        exact = _exact(args, cot)
        reference = _output_and_grads(merged_swiglu_reference, args, cot, key)
        try:
            fused = _output_and_grads(_fused(key.impl), args, cot, key)
            if key.device.startswith("cuda"):
                torch.cuda.synchronize(key.device)
        except Exception as err:
            what = f"{type(err).__name__} at compile or run: {_summary(err)}"
            return CheckResult(key, what, time.perf_counter() - start)
    errors, failure = _compare(key, fused, reference, exact)
    result = CheckResult(key, failure, time.perf_counter() - start, errors)
    if result.ok:
        what = FUSED[key.impl]
        log.info("lory: fused %s merge self-check passed on %s in %.2f s", what, key.describe(), result.seconds)
    return result
