"""Process groups: torch.distributed plus megatron-core's parallel_state, created once at start-up.

`init_groups` returns one frozen ParallelGroups that the trainer passes down explicitly; model
code never reads module globals. A single process without a launcher gets `local_groups()`:
every degree 1, no process group, and the same code paths.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megamoe.parallel.layout import Layout

log = logging.getLogger(__name__)
_created_default: list[bool] = [False]
"""Whether init_groups created the default process group (then destroy_groups destroys it)."""


@dataclass(frozen=True)
class Axis:
    """One parallel axis of this rank: its group (None when the degree is 1), size and rank in it."""

    group: dist.ProcessGroup | None
    size: int
    rank: int

    @property
    def ranks(self) -> list[int]:
        """Global ranks in this rank's group."""
        return dist.get_process_group_ranks(self.group) if self.group is not None else [0]


LOCAL_AXIS = Axis(None, 1, 0)


@dataclass(frozen=True)
class ParallelGroups:
    """Every process group this rank belongs to."""

    world: int
    rank: int
    tp: Axis
    dp: Axis
    ep: Axis
    etp: Axis
    edp: Axis
    layout: Layout
    device: torch.device
    meshes: dict | None = None
    """DeviceMeshes over the same groups, for DTensor checkpoints: 'dense' (dp, tp) and 'expert'
    (edp, ep, etp) of this rank's pipeline stage; None in a single process."""
    pp: Axis = LOCAL_AXIS
    """The pipeline: one rank per stage, in stage order."""

    @property
    def distributed(self) -> bool:
        """More than one process."""
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """The rank that logs, writes run files and prepares data."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (no-op in a single process)."""
        if self.distributed:
            dist.barrier()


def launched_world_size() -> int:
    """WORLD_SIZE set by torchrun/SLURM launchers, else 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_groups(layout: Layout, device: torch.device) -> ParallelGroups:
    """Groups of a single process: every axis has degree 1."""
    ax = LOCAL_AXIS
    return ParallelGroups(1, 0, ax, ax, ax, ax, ax, layout, device)


def _axis(group: dist.ProcessGroup) -> Axis:
    """An Axis from a megatron-core group."""
    return Axis(group, dist.get_world_size(group), dist.get_rank(group))


def init_groups(layout: Layout, timeout_s: int, seed: int = 0) -> ParallelGroups:
    """Initialize torch.distributed from the launcher's environment and megatron-core's groups.

    On CUDA this also seeds megatron-core's model-parallel RNG tracker (identical default streams on
    the TP ranks of a group, distinct ones in tensor-parallel regions). It asserts CUDA, so on CPU
    the model relies on what it already has: no random op in the forward pass, a layout-independent
    seeded init, and explicit per-(seed, step, layer) generators for stochastic routers.
    """
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():  # a caller's own default group is used as it is, and left to the caller
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
        _created_default[0] = True
    if dist.get_world_size() != layout.world:
        raise RuntimeError(f"launched {dist.get_world_size()} ranks, layout expects {layout.world}")
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
        distributed_timeout_minutes=max(1, timeout_s // 60),
        create_gloo_process_groups=False,
    )
    if cuda:
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)
    groups = ParallelGroups(
        world=dist.get_world_size(),
        rank=dist.get_rank(),
        tp=_axis(ps.get_tensor_model_parallel_group()),
        dp=_axis(ps.get_data_parallel_group()),
        ep=_axis(ps.get_expert_model_parallel_group()),
        etp=_axis(ps.get_expert_tensor_parallel_group()),
        edp=_axis(ps.get_expert_data_parallel_group()),
        layout=layout,
        device=device,
        meshes=_meshes(layout, ps, device),
        pp=_axis(ps.get_pipeline_model_parallel_group()),
    )
    log.info("rank %d: %s (tp %s, dp %s)", groups.rank, layout.describe(), groups.tp.ranks, groups.dp.ranks)
    return groups


def _meshes(layout: Layout, ps, device: torch.device) -> dict:
    """DeviceMeshes built from megatron-core's groups (its rank order: tp fastest, then ep, then dp)."""
    from torch.distributed.device_mesh import DeviceMesh

    per_stage = layout.world // layout.pp  # megatron-core's order: the pipeline rank is outermost
    world = torch.arange(per_stage) + ps.get_pipeline_model_parallel_rank() * per_stage
    dense = DeviceMesh.from_group(
        [ps.get_data_parallel_group(), ps.get_tensor_model_parallel_group()], device.type,
        mesh=world.view(layout.dp, layout.tp), mesh_dim_names=("dp", "tp"),
    )  # fmt: skip
    expert_groups = [
        ps.get_expert_data_parallel_group(), ps.get_expert_model_parallel_group(), ps.get_expert_tensor_parallel_group()
    ]  # fmt: skip
    expert = DeviceMesh.from_group(
        expert_groups,
        device.type,
        mesh=world.view(layout.edp, layout.ep, layout.etp),
        mesh_dim_names=("edp", "ep", "etp"),
    )
    return {"dense": dense, "expert": expert}


def destroy_groups() -> None:
    """Tear down megatron-core's groups, and the default process group if init_groups created it."""
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    if dist.is_initialized() and _created_default[0]:
        dist.destroy_process_group()
        _created_default[0] = False
