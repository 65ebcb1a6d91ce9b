"""Layout parity: every step of a parallel run against single-process math from the *same* state.

Comparing two independent fp32 trajectories element by element cannot be made hardware-proof:
Adam divides every update by √v, so for an element whose gradient is a near-cancelling sum, the
rounding of one CPU's kernels (AVX2, AVX-512, AMX) becomes a visible update (seen: 3.6e-6 on one
embedding element on an Intel AMX machine). So the checks are split by what is exact:

Per step t (teacher forcing), from the layout's own checkpoint t-1 (its step-0 state is the
layout-independent init), one single-process step is taken and compared with the layout's step t:
1. loss and pre-clip gradient norm: relative RTOL (fp32 reductions in another order);
2. the pre-optimizer (post-clip) gradient, per tensor, recovered from the layout's moments as
   g = (m_t - β1·m_{t-1}) / (1 - β1): ‖g_layout - g_single‖ ≤ RTOL·‖g_single‖ + u·√n·‖g‖ + the
   rounding of the recovery; and the second moment v with the bound that implies
   (‖g_L² - g_S²‖ ≤ ‖g_L - g_S‖·max|g_L + g_S|). The middle term, one unit roundoff of the whole
   step's gradient norm ‖g‖ per element of the n-element tensor, is the floor for a tensor whose
   gradient cancels to ~0: right after Lory's upcycling the experts are identical, so the router's
   gradient is analytically zero and what both runs compute is rounding noise (seen: 3e-11), which no
   relative tolerance can compare;
3. the update: the layout's parameters at t equal AdamW applied, in float64, to its own parameters at
   t-1 and its own moments at t, within the rounding of AdamW's ≤ 8 fp32 operations (ADAM_ULPS units
   of roundoff of the magnitudes involved). This part is exact math, so its bound is a few ulps.
Along the trajectory: losses, grad norms and the listed metrics at every logged step (RTOL), and the
final parameters against the single-process run within the bound no two AdamW runs can exceed,
2·Σ_t lr_t·U_t (U_t: the largest |m̂_t|/√v̂_t any gradient sequence can give); this catches only gross
errors (a tensor not trained, or trained at a wrong rate): the per-step checks carry the precision.

RTOL = 1e-5, derived: fp32 roundoff u = 2^-24 ≈ 6e-8; a gradient element is a sum of K = B·L = 256
token terms per reduction stage, whose probabilistic error bound is √K·u ≈ 1e-6 relative, and about
ten sequential stages (two layers of norm, attention, SwiGLU, forward and backward) add in
quadrature to ≈ 3e-6; 1e-5 leaves a 3× margin. Measured on an Intel AMX machine: ≤ 6.5e-7 per tensor
at step 1 for every dense layout. A real layout bug moves some tensor's gradient by ≥ 1/2 (a dropped
or doubled reduction over 2 ranks): five orders of magnitude above RTOL (test_planted_bug_fails).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from megamoe.config import Config
from megamoe.model import build_model
from megamoe.train.checkpoint import architecture, list_checkpoints, load_checkpoint
from megamoe.train.engine import PlainEngine
from megamoe.train.optim import lr_at
from megamoe.train.run import load_run_config
from tests.distributed.helpers import metrics
from tests.util import single_process_trainer

RTOL = 1e-5
U = 2.0**-24
ADAM_ULPS = 8
"""AdamW's update is ≤ 8 fp32 roundings (decay, sqrt, two divisions, add ε, multiply, add); each is ≤ u."""


@dataclass
class State:
    """Parameters and AdamW moments by parameter name (full single-device shapes)."""

    params: dict[str, torch.Tensor]
    moments: dict[str, torch.Tensor]


def read_state(run_dir: Path, checkpoint: Path) -> State:
    """A checkpoint of any layout, resharded into a single-process model."""
    cfg = load_run_config(str(run_dir), [])
    model = build_model(cfg.model, 0, moe=cfg.moe)
    engine = PlainEngine(model, cfg.optim, 1, False)
    load_checkpoint(checkpoint, model, engine, architecture(cfg))
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return State(params, {k: v.detach().clone() for k, v in engine.optimizer_state().items()})


@dataclass
class TeacherStep:
    """One single-process step from a given state."""

    loss: float
    grad_norm: float
    grads: dict[str, torch.Tensor]
    before: State
    """Parameters and moments right before the optimizer step (after any Lory upcycling)."""

    @property
    def norm(self) -> float:
        """The global norm of the (post-clip) gradient."""
        return float(torch.stack([g.double().norm() for g in self.grads.values()]).norm())


def teacher_step(cfg: Config, checkpoint: Path | None) -> TeacherStep:
    """Take the next step single-process from `checkpoint` (None: from the init), observing the optimizer's inputs."""
    trainer = single_process_trainer(cfg, checkpoint=checkpoint)
    model, optimizer, seen = trainer.model, trainer.engine.optimizer, {}
    real_step = optimizer.step

    def observed_step(*args, **kwargs):
        seen["grads"] = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        seen["before"] = State(
            {n: p.detach().clone() for n, p in model.named_parameters()},
            {k: v.detach().clone() for k, v in trainer.engine.optimizer_state().items()},
        )
        return real_step(*args, **kwargs)

    optimizer.step = observed_step
    out = trainer.train_step()
    return TeacherStep(out["train/loss"], out["train/grad_norm"], seen["grads"], seen["before"])


def adam_update_bound(t: int, beta1: float, beta2: float) -> float:
    """max over gradient sequences of |m̂_t| / √v̂_t (Cauchy–Schwarz: √Σ a_k²/b_k for m̂ = Σa_k g_k, v̂ = Σb_k g_k²)."""
    a = [(1 - beta1) * beta1 ** (t - k) / (1 - beta1**t) for k in range(1, t + 1)]
    b = [(1 - beta2) * beta2 ** (t - k) / (1 - beta2**t) for k in range(1, t + 1)]
    return math.sqrt(sum(x * x / y for x, y in zip(a, b)))


def adamw_replay(before: torch.Tensor, m: torch.Tensor, v: torch.Tensor, lr: float, wd: float, t: int, cfg) -> tuple:
    """torch AdamW's update in float64 from the given moments: (new parameters, |update|)."""
    p, m, v = before.double(), m.double(), v.double()
    step_size = lr / (1 - cfg.beta1**t)
    update = step_size * m / (v.sqrt() / math.sqrt(1 - cfg.beta2**t) + cfg.eps)
    return p * (1 - lr * wd) - update, update.abs()


def _close(a: float, b: float, what: str) -> None:
    """Relative RTOL."""
    assert a == b or abs(a - b) <= RTOL * abs(b), f"{what}: {a} vs {b} (relative {abs(a - b) / abs(b):.1e})"


def check_step(name: str, t: int, layout: State, teacher: TeacherStep, cfg: Config) -> None:
    """Gradient, second moment and update of one parameter tensor at step t."""
    ocfg = cfg.optim
    m_prev, v_prev = teacher.before.moments[f"{name}.exp_avg"], teacher.before.moments[f"{name}.exp_avg_sq"]
    m, v = layout.moments[f"{name}.exp_avg"], layout.moments[f"{name}.exp_avg_sq"]
    g_single = teacher.grads.get(name, torch.zeros_like(m))
    g_layout = (m - ocfg.beta1 * m_prev) / (1 - ocfg.beta1)
    recovery = 2 * U * (m.norm() + ocfg.beta1 * m_prev.norm()) / (1 - ocfg.beta1)
    floor = U * math.sqrt(m.numel()) * teacher.norm
    err, allowed = (g_layout - g_single).norm(), RTOL * g_single.norm() + floor + recovery
    assert err <= allowed, (
        f"step {t} {name}: gradient differs by {err:.3e} (allowed {allowed:.3e}, norm {g_single.norm():.3e})"
    )
    v_single = ocfg.beta2 * v_prev + (1 - ocfg.beta2) * g_single.square()
    spread = 2 * g_single.abs().max() + err
    allowed_v = (1 - ocfg.beta2) * allowed * spread + 4 * U * v_single.norm()
    err_v = (v - v_single).norm()
    assert err_v <= allowed_v, f"step {t} {name}: exp_avg_sq differs by {err_v:.3e} (allowed {allowed_v:.3e})"
    before = teacher.before.params[name]
    wd = ocfg.weight_decay if before.ndim >= 2 else 0.0
    want, update = adamw_replay(before, m, v, lr_at(t - 1, ocfg, cfg.train.max_steps), wd, t, ocfg)
    bound = ADAM_ULPS * U * (before.double().abs() + update)
    diff = (layout.params[name].double() - want).abs()
    worst = int((diff - bound).argmax())
    assert bool((diff <= bound).all()), (
        f"step {t} {name}: the update is not AdamW of the layout's own moments at element {worst}: "
        f"{diff.flatten()[worst]:.3e} > {bound.flatten()[worst]:.3e}"
    )


def check_every_step(run_dir: Path, cfg: Config) -> None:
    """Teacher-forced comparison of each of the layout's steps (checkpoints at every step are needed)."""
    saved = {int(p.name.removeprefix("step_")): p for p in list_checkpoints(run_dir)}
    steps = cfg.train.max_steps
    assert sorted(saved) == list(range(1, steps + 1)), f"need a checkpoint at every step, found {sorted(saved)}"
    logged = {key: dict(metrics(run_dir, key)) for key in ("train/loss", "train/grad_norm")}
    for t in range(1, steps + 1):
        teacher = teacher_step(cfg, saved.get(t - 1))
        layout = read_state(run_dir, saved[t])
        assert layout.params.keys() == teacher.before.params.keys()
        for name in layout.params:  # first: the message names the tensor
            check_step(name, t, layout, teacher, cfg)
        _close(logged["train/loss"][t], teacher.loss, f"step {t} loss")
        _close(logged["train/grad_norm"][t], teacher.grad_norm, f"step {t} grad norm")


def final_bound(cfg: Config) -> float:
    """2·Σ_t lr_t·U_t: no element of two AdamW runs from the same init can differ by more."""
    ocfg, steps = cfg.optim, cfg.train.max_steps
    return 2 * sum(
        lr_at(t - 1, ocfg, steps) * adam_update_bound(t, ocfg.beta1, ocfg.beta2) for t in range(1, steps + 1)
    )


def check_trajectory(run_dir: Path, reference: dict, keys: tuple[str, ...], from_step: int = 0) -> None:
    """Logged metrics at every step > from_step equal the single-process run's (RTOL)."""
    for key in keys:
        got = [(s, v) for s, v in metrics(run_dir, key) if s > from_step]
        want = [(s, v) for s, v in reference["metrics"][key] if s > from_step]
        assert [s for s, _ in got] == [s for s, _ in want], key
        for (step, a), (_, b) in zip(got, want):
            _close(a, b, f"{key} at step {step}")


def check_final(run_dir: Path, reference: dict, cfg: Config) -> None:
    """Final parameters within the AdamW bound of the single-process run's."""
    got, bound = read_state(run_dir, list_checkpoints(run_dir)[-1]).params, final_bound(cfg)
    for name, want in reference["params"].items():
        diff = (got[name] - want).abs().max().item()
        assert diff <= bound, f"final {name} differs by {diff:.3e} > {bound:.3e}"
