"""Data parallelism through DeepSpeed's engine (ZeRO 0/1/2), fed with megatron-core's process groups.

One source of truth: DeepSpeed reads the tensor- and data-parallel groups through an mpu adapter
over `ParallelGroups`, and megatron-core's expert-parallel / expert-data-parallel groups are
registered in DeepSpeed's group table under DeepSpeed's own name (`ep_size_<EP>`). Parameters
marked with `mark_expert` are DeepSpeed "MoE parameters": their gradients are reduced (and, with
ZeRO, their optimizer state partitioned) over the expert-data-parallel group instead of the
data-parallel group. DeepSpeed switches that on only when it finds its own MoE module class, so a
small engine subclass also switches it on for marked parameters.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.distributed as dist
from deepspeed import comm as ds_comm
from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer
from deepspeed.runtime.config import DeepSpeedConfig
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.utils import groups as ds_groups
from deepspeed.utils import (
    lazy_init_hp_params_optimizer_state,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)
from torch import nn

from megamoe.parallel.extensions import ensure_deepspeed_ops
from megamoe.parallel.groups import ParallelGroups
from megamoe.utils.state import OPTIM_KEYS


def expert_group_name(groups: ParallelGroups) -> str:
    """DeepSpeed's name for the expert groups of this layout."""
    return f"ep_size_{groups.ep.size}"


def mark_expert(param: nn.Parameter, groups: ParallelGroups) -> None:
    """Make param an expert parameter: reduced over the expert-data-parallel group."""
    param.allreduce = False
    param.group_name = expert_group_name(groups)


class MegatronMpu:
    """DeepSpeed's model-parallel-unit interface, answered from megatron-core's groups."""

    def __init__(self, groups: ParallelGroups):
        self.groups = groups

    def get_model_parallel_group(self):
        return self.groups.tp.group

    def get_model_parallel_rank(self) -> int:
        return self.groups.tp.rank

    def get_model_parallel_world_size(self) -> int:
        return self.groups.tp.size

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.groups.tp.ranks[0]

    def get_data_parallel_group(self):
        return self.groups.dp.group

    def get_data_parallel_rank(self) -> int:
        return self.groups.dp.rank

    def get_data_parallel_world_size(self) -> int:
        return self.groups.dp.size

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self.groups.dp.ranks


def register_expert_groups(groups: ParallelGroups) -> str:
    """Put megatron-core's EP and expert-DP groups into DeepSpeed's group table; returns their name."""
    name = expert_group_name(groups)
    ds_groups._EXPERT_PARALLEL_GROUP[name] = groups.ep.group
    ds_groups._EXPERT_PARALLEL_GROUP_RANKS[name] = groups.ep.ranks
    ds_groups._EXPERT_DATA_PARALLEL_GROUP[name] = groups.edp.group
    ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = groups.edp.ranks
    return name


def _mark_experts(model: nn.Module, groups: ParallelGroups) -> None:
    """Mark expert parameters as DeepSpeed MoE parameters.

    Gradients: DeepSpeed sums an expert's gradient over its expert-DP replicas and divides by the
    DP size. The replicas together saw every routed token of the DP micro-step once (MoE blocks
    split tokens over TP), so that is exactly the dense convention, a mean over DP of per-rank
    means, on every layout.

    Norm: ZeRO sums squared partition norms over DP, then over TP, counting a parameter on every
    TP rank only if it is "model parallel". Every expert element lives in exactly one rank's
    partition, so marking experts model-parallel makes that sum exact.
    """
    for param in model.parameters():
        if getattr(param, "expert", False):
            mark_expert(param, groups)
            param.tensor_model_parallel = True


@torch.no_grad()
def clip_reduced_grads(model: nn.Module, groups: ParallelGroups, max_norm: float) -> float:
    """Global norm of DP-reduced, unpartitioned gradients (ZeRO stage 0), then clip; returns the norm.

    Tensor-parallel shards are summed over TP, replicated parameters counted once, expert
    shards summed over the world and divided by their expert-DP replicas.
    """
    sharded, replicated, expert = (torch.zeros((), dtype=torch.float64) for _ in range(3))
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    for param in model.parameters():
        if param.grad is None:
            continue
        square = param.grad.detach().double().pow(2).sum().cpu()
        if getattr(param, "expert", False):
            expert += square
        elif getattr(param, "shards", ()):
            sharded += square
        else:
            replicated += square
    dist.all_reduce(sharded, group=groups.tp.group)
    dist.all_reduce(expert)
    total = float((sharded + replicated + expert / groups.edp.size).sqrt())
    if total > max_norm:
        torch._foreach_mul_(grads, max_norm / (total + 1e-6))
    return total


class _ExpertAwareEngine(DeepSpeedEngine):
    """DeepSpeedEngine that treats `mark_expert` parameters as MoE parameters."""

    def _configure_distributed_model(self, model: nn.Module) -> None:
        super()._configure_distributed_model(model)
        if any(is_moe_param(p) for p in model.parameters()):
            self.has_moe_layers = True


def deepspeed_config(
    micro_batch: int, accumulation: int, dp: int, zero_stage: int, grad_clip: float, bf16: bool
) -> dict:
    """The DeepSpeed config for one layout."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro_batch * accumulation * dp,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage, "contiguous_gradients": True, "reduce_scatter": True},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


class ZeroEngine:
    """Forward/backward/step of one rank under DeepSpeed (the distributed twin of PlainEngine)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, groups: ParallelGroups, config: dict):
        self.bf16 = config["bf16"]["enabled"]
        self._zero = config["zero_optimization"]["stage"] > 0 or self.bf16
        # Without ZeRO or bf16 DeepSpeed clips with clip_grad_norm_ and drops the norm: call it ourselves.
        self._clip = (config["gradient_clipping"] or math.inf) if not self._zero else None
        if self._clip is not None:
            config = {**config, "gradient_clipping": 0.0}
        self._norm = math.nan
        register_expert_groups(groups)
        _mark_experts(model, groups)
        ensure_deepspeed_ops()
        ds_comm.init_distributed(
            dist_backend=ds_comm.get_accelerator().communication_backend_name(), dist_init_required=False
        )
        mpu = MegatronMpu(groups)
        if any(is_moe_param(p) for p in model.parameters()):
            optimizer.param_groups[:] = split_params_into_different_moe_groups_for_optimizer(optimizer.param_groups)
        self.engine = _ExpertAwareEngine(
            args=None, model=model, optimizer=optimizer, mpu=mpu, dist_init_required=False,
            config=config, config_class=DeepSpeedConfig(config, mpu),
        )  # fmt: skip
        self.model, self.groups = model, groups

    def autocast(self) -> contextlib.AbstractContextManager:
        """DeepSpeed's bf16 mode keeps bf16 weights itself: no autocast needed."""
        return contextlib.nullcontext()

    def set_lr(self, lr: float) -> None:
        """Set the learning rate of every param group."""
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's mean loss (DeepSpeed scales by 1/accumulation and reduces at the boundary).

        A non-finite global norm skips the update: DeepSpeed's ZeRO and bf16 optimizers do it themselves
        (and report the norm as inf); without them the gradients are dropped before the step, so the
        torch optimizer leaves every parameter, moment and step count as it was.
        """
        self.engine.backward(loss)
        if self._clip is not None and self.engine.is_gradient_accumulation_boundary():
            self._norm = clip_reduced_grads(self.model, self.groups, self._clip)
            if not math.isfinite(self._norm):
                for param in self.model.parameters():
                    param.grad = None
        self.engine.step()  # a no-op except at the accumulation boundary

    def step(self) -> float:
        """The optimizer step already ran (or was skipped) at the boundary; return its pre-clip gradient norm."""
        if self._clip is not None:
            return self._norm
        norm = self.engine.get_global_grad_norm()
        return float(norm.item() if torch.is_tensor(norm) else norm)

    def _params(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Trainable parameters by name."""
        return ((n, p) for n, p in self.model.named_parameters() if p.requires_grad)

    def _link_state(self) -> None:
        """Give every parameter its optimizer-state fragments (ZeRO 1/2 and the bf16 optimizer).

        DeepSpeed links fragments lazily, right after stepping the *first* param group, and never
        again, so parameters of later groups (here: the no-decay norms) would have none; before the
        first step nobody has any. Missing inner AdamW states are created exactly as AdamW's own lazy
        init would (step 0, zero moments), then every group is (re)linked.
        """
        opt = self.engine.optimizer
        flats = getattr(opt, "single_partition_of_fp32_groups", None) or getattr(
            opt, "fp32_groups_flat_partition", None
        )
        if flats is None:
            return
        lp_groups = getattr(opt, "bit16_groups", None) or opt.bf16_groups
        for lp_params, flat in zip(lp_groups, flats):
            state = opt.optimizer.state[flat]
            if "exp_avg" not in state:
                state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(flat), exp_avg_sq=torch.zeros_like(flat))
            lazy_init_hp_params_optimizer_state(lp_params, flat, opt.optimizer.state)

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        """exp_avg / exp_avg_sq of every parameter, unpartitioned over DP (this rank's TP slice)."""
        self._link_state()
        state = {}
        for name, param in self._params():
            for key in OPTIM_KEYS:
                value = safe_get_full_optimizer_state(param, key) if self._zero else self._plain_state(param)[key]
                state[f"{name}.{key}"] = value.detach().float().cpu()
        return state

    def _plain_state(self, param: nn.Parameter) -> dict:
        """The torch optimizer's state of one parameter (ZeRO stage 0, fp32)."""
        return self.engine.optimizer.state[param]

    @torch.no_grad()
    def load_state(self, params: dict[str, torch.Tensor], state: dict[str, torch.Tensor], step: int) -> None:
        """Restore every parameter (and ZeRO's fp32 master copy of it), its moments, and the step count."""
        self._link_state()
        for name, param in self._params():
            param.copy_(params[name])
            if self._zero:
                safe_set_full_fp32_param(param, params[name].to(param.device, torch.float32))
            for key in OPTIM_KEYS:
                value = state[f"{name}.{key}"].to(param.device)
                if self._zero:
                    safe_set_full_optimizer_state(param, value, key)
                else:
                    self._plain_state(param)[key] = value.clone()
        inner = self.engine.optimizer.optimizer if self._zero else self.engine.optimizer
        for param_state in inner.state.values():
            param_state["step"] = torch.tensor(float(step))
