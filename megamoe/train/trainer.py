"""The training loop: accumulate micro-batches, step, evaluate, checkpoint, log — on one rank of any layout.

Shape legend: B micro-batch, L sequence.
The same loop runs a single process (PlainEngine, plain layers) and every distributed layout
(ZeroEngine over DeepSpeed, megatron-core tensor-parallel layers when TP > 1). Everything that
differs between layouts sits behind ParallelGroups, the layer factory and the engine.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from megamoe.config import Config, config_to_dict
from megamoe.data import BlendSampler, PackedSplit, PreparedBlend, SequenceSampler
from megamoe.errors import CheckpointError, CorruptCheckpointError, DataError, NonFiniteError
from megamoe.model import LayerFactory, build_model
from megamoe.model.moe.noise import RoutingContext
from megamoe.model.params import count_parameters, flops_per_token, meta_counts
from megamoe.model.recompute import set_recompute
from megamoe.parallel.groups import ParallelGroups
from megamoe.train import checkpoint as ckpt
from megamoe.train.blend_metrics import blend_eval_indices, blend_eval_metrics, describe_blend, share_metrics
from megamoe.train.dist import any_rank, barrier, is_main, mean_over, sum_over
from megamoe.train.domain_routing import domain_routing_metrics
from megamoe.train.engine import PlainEngine
from megamoe.train.evaluate import eval_indices, eval_metrics, eval_sums, rank_share
from megamoe.train.expert_bias import bias_metrics, update_expert_biases
from megamoe.train.flops import peak_tflops
from megamoe.train.init_from import init_from
from megamoe.train.metrics import ROUTER_HEALTH_FILE, ROUTING_DOMAINS_FILE, MetricSinks
from megamoe.train.moe_metrics import MoEMetrics
from megamoe.train.optim import build_optimizer, lr_at
from megamoe.train.pipeline_steps import (
    gather_over_pipeline,
    lory_moe_layers,
    moe_layers,
    pipeline_eval_sums,
    pipeline_step,
)
from megamoe.train.preempt import PreemptionFlag
from megamoe.train.router_probe import RouterHealth
from megamoe.train.run import RunSetup
from megamoe.train.upcycle import upcycle, warmup_steps
from megamoe.utils.fs import atomic_write_json
from megamoe.utils.host import native_bf16

log = logging.getLogger(__name__)


def pick_device(name: str) -> torch.device:
    """train.device resolved for a single process (auto = CUDA when available)."""
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def uses_bf16(device: torch.device, precision: str) -> bool:
    """train.precision resolved: bf16 explicitly, or auto on CUDA."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def emulated_bf16_warning(device: torch.device, bf16: bool, native: list[str] | None) -> str | None:
    """What to tell a user who runs bf16 on a CPU without native bf16 (None when nothing is wrong or unknown)."""
    if not bf16 or device.type != "cpu" or native is None or native:
        return None
    return (
        "train.precision=bf16 on a CPU without native bf16 (no amx_bf16 or avx512_bf16 in /proc/cpuinfo): "
        "autocast emulates it, at 0.03-0.11x the fp32 speed on such a CPU (docs/benchmarks.md); "
        "train.precision=fp32 (or auto) is the fast choice here"
    )


class Trainer:
    """One training run, seen from one rank."""

    def __init__(self, setup: RunSetup, groups: ParallelGroups):
        self.cfg: Config = setup.cfg
        self.run_dir: Path = setup.run_dir
        self.data = setup.data
        self.blend = self.data if isinstance(self.data, PreparedBlend) else None
        """The sources of a data.blend run (None: one source)."""
        self.groups = groups
        torch.manual_seed(self.cfg.train.seed)
        self.model = build_model(self.cfg.model, self.cfg.train.seed, self._factory(), self.cfg.moe, self._part()).to(
            groups.device
        )
        set_recompute(self.model, self.cfg.train.recompute)
        self.model.loss_chunk_tokens = self.cfg.train.loss_chunk_tokens
        self.pipeline = self._pipeline()
        self.engine = self._engine()
        self.train_split, self.val_split = self._splits()
        self.sampler = self._sampler()
        self.step = 0
        self.updates = 0
        """Optimizer updates applied (steps minus skipped non-finite ones): Adam's bias-correction count."""
        self.bad_in_a_row = 0
        self.last_loss = float("nan")
        if setup.resume_from:
            self._resume(setup.resume_from, setup.resume_explicit)
        elif self.cfg.model.init_from:  # a fresh start from another run's weights (a resume ignores it)
            init_from(self.model, self.engine, self.cfg)
        self.domain_routing: dict | None = None
        """The last evaluation's per-domain routing weights per Lory layer."""
        self.dense_steps = warmup_steps(self.cfg)
        self.model.set_dense_phase(self.step < self.dense_steps)
        self.counts = meta_counts(self.cfg.model, moe=self.cfg.moe)
        self.flops_per_token = flops_per_token(self.cfg.model, self.counts, self.cfg.moe)
        self.peak, self.peak_source = peak_tflops(groups.device, self.cfg.logging.peak_tflops)
        self.health = RouterHealth(self.model) if self.cfg.logging.router_health else None
        self.health_record: dict[str, float] = {}
        """logging.router_health: the last step's record (megamoe.train.router_probe)."""

    def _factory(self) -> LayerFactory:
        """Plain layers in a single process; otherwise this rank's parallel layers (TP, EP, ETP)."""
        if not self.groups.distributed:
            return LayerFactory()
        from megamoe.parallel.specs import ParallelFactory

        return ParallelFactory(self.groups.tp.size, self.groups, self.cfg.parallel.sequence_parallel)

    def _engine(self):
        """PlainEngine in a single process, DeepSpeed's engine across processes."""
        bf16 = uses_bf16(self.groups.device, self.cfg.train.precision)
        if is_main() and (warning := emulated_bf16_warning(self.groups.device, bf16, native_bf16())):
            log.warning(warning)
        layout = self.groups.layout
        if not self.groups.distributed:
            return PlainEngine(self.model, self.cfg.optim, layout.micro_batches, bf16)
        if self.pipeline is not None:
            from megamoe.parallel.pipeline_engine import PipelineEngine

            optimizer = build_optimizer(self.model, self.cfg.optim)
            replicas = self.pipeline.plan.replicas
            return PipelineEngine(self.model, optimizer, self.cfg.optim.grad_clip, self.groups, replicas, bf16)
        from megamoe.parallel.zero import ZeroEngine, deepspeed_config

        config = deepspeed_config(
            self.cfg.train.micro_batch_size, layout.micro_batches, layout.dp,
            self.cfg.parallel.zero_stage, self.cfg.optim.grad_clip, bf16,
        )  # fmt: skip
        return ZeroEngine(self.model, build_optimizer(self.model, self.cfg.optim), self.groups, config)

    def _part(self):
        """A pipeline rank builds only its stage (None: the whole model)."""
        if self.groups.layout.pp == 1:
            return None
        from megamoe.parallel.pipeline import stage_part

        return stage_part(self.cfg, self.groups.pp.rank, self.groups.pp.size)

    def _pipeline(self):
        """This rank's pipeline stages (of the model built with its Part) when parallel.pipeline_parallel > 1."""
        if self.groups.layout.pp == 1:
            return None
        from megamoe.parallel.pipeline_run import Pipeline

        pipeline = Pipeline(self.model, self.cfg, self.groups)
        self.model.checkpoint_skip = {r.name for r in pipeline.plan.replicas if not r.owner}
        return pipeline

    def _splits(self) -> tuple[PackedSplit, PackedSplit]:
        """Train and val splits, each holding at least one full sequence (of every blend source)."""
        sources = [(p.data, f"data.blend source {p.name!r}: ") for p in self.data.parts] if self.blend else []
        need = self.cfg.model.seq_len + 1
        for data, where in sources or [(self.data, "")]:
            for name in ("train", "val"):
                split = data.split(name)
                if split.num_sequences(self.cfg.model.seq_len) == 0:
                    raise DataError(
                        f"data: {where}the {name} split of {data.root} has {len(split.tokens)} tokens, fewer than "
                        f"one sequence (model.seq_len + 1 = {need}); add documents or shorten model.seq_len"
                    )
        return self.data.split("train"), self.data.split("val")

    def _sampler(self) -> SequenceSampler | BlendSampler:
        """The training stream: one source's seeded epochs, or the blend's weighted mix of each source's own."""
        seq_len, seed = self.cfg.model.seq_len, self.cfg.train.seed
        if self.blend is None:
            return SequenceSampler(self.train_split.num_sequences(seq_len), seed)
        sizes = [split.num_sequences(seq_len) for split in self.train_split.parts]
        return BlendSampler(sizes, [part.weight for part in self.blend.parts], seed)

    def _resume(self, candidates: list[Path], explicit: bool) -> None:
        """Continue from the newest loadable checkpoint (of any layout): weights, optimizer, RNG and step.

        A candidate that turns out corrupt while loading is set aside and the next older one tried,
        unless the user named it (--resume-from): then its error stops the run.
        """
        for path in candidates:
            try:
                if why := ckpt.checksum_problem(path):
                    raise CorruptCheckpointError(f"{path}: checkpoint is corrupt ({why})")
                meta = ckpt.load_checkpoint(
                    path, self.model, self.engine, ckpt.architecture(self.cfg), self.groups.meshes
                )
            except CorruptCheckpointError as err:
                if explicit:
                    raise
                if is_main():
                    ckpt.set_aside(path, str(err).removeprefix(f"{path}: "))
                barrier()
                continue
            break
        else:
            raise CheckpointError(f"--resume: no loadable checkpoint in {ckpt.checkpoints_root(self.run_dir)}")
        if meta.get("data_key") != self.data.manifest["key"]:
            log.warning(
                "resume: the data cache key changed (%s -> %s)", meta.get("data_key"), self.data.manifest["key"]
            )
        self.step = int(meta["step"])
        self.updates = int(meta.get("optimizer_steps", self.step))
        log.info("resumed from %s (written at %s) at step %d", path, meta.get("layout"), self.step)

    @property
    def tokens_per_step(self) -> int:
        """Tokens consumed by one optimizer step over all ranks."""
        return self.cfg.train.global_batch_size * self.cfg.model.seq_len

    def _batch(self, split: PackedSplit, ids: np.ndarray):
        """Inputs and targets of some sequences, on this rank's device."""
        batch = split.batch(ids, self.cfg.model.seq_len)
        return batch.tokens_BL.to(self.groups.device), batch.targets_BL.to(self.groups.device)

    def train_step(self) -> dict[str, float]:
        """One optimizer step over the global batch (this rank's share, accumulated over micro-batches)."""
        tcfg, dp = self.cfg.train, self.groups.dp
        lr = lr_at(self.step, self.cfg.optim, tcfg.max_steps)
        self.engine.set_lr(lr)
        micro = self.sampler.micro_batches(self.step, tcfg.global_batch_size, dp.rank, dp.size, tcfg.micro_batch_size)
        self._dense_warmup()
        moe = MoEMetrics(self.cfg.moe, moe_layers(self.cfg), self.groups.pp.size) if self.cfg.moe.enabled else None
        run = self._micro_steps if self.pipeline is None else functools.partial(pipeline_step, self)
        loss_sum = run(micro, moe)
        grad_norm = self.engine.step()
        if self.health is not None:  # collective: every rank takes, the logging rank writes
            self.health_record = self.health.take(self.groups.dp) | {"train/grad_norm": grad_norm}
        self.step += 1
        loss = mean_over(loss_sum / len(micro), dp).item()
        updates = self.updates
        self._check_finite(loss, grad_norm)
        metrics = {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm}
        return metrics | self._moe_step(moe, applied=self.updates > updates)

    def _micro_steps(self, micro: list[np.ndarray], moe: MoEMetrics | None) -> torch.Tensor:
        """Forward and backward of each micro-batch (gradients accumulate); returns the summed mean losses."""
        loss_sum = torch.zeros((), device=self.groups.device)
        for ids in micro:
            tokens_BL, targets_BL = self._batch(self.train_split, ids)
            ctx = RoutingContext(self.cfg.train.seed, self.step, tuple(int(i) for i in ids))
            with self.engine.autocast():
                out = self.model(tokens_BL, targets_BL, ctx)
            self.engine.backward(out.loss + out.aux_loss)
            loss_sum += out.loss.detach()
            if moe is not None:
                moe.add(out.moe)
        return loss_sum

    def _moe_step(self, moe: MoEMetrics | None, applied: bool) -> dict[str, float]:
        """The step's MoE metrics (collective); aux_free: each block's bias moves by the global batch's loads."""
        if moe is None:
            return {}
        metrics = moe.reduce()
        if applied:
            update_expert_biases(self.model, moe.requested, self.cfg.moe.bias_update_rate)
        if self.cfg.moe.balance != "aux_free":  # no biases: nothing to log (and no collective)
            return metrics
        return metrics | gather_over_pipeline(self.groups, bias_metrics(self.model))

    def _check_finite(self, loss: float, grad_norm: float) -> None:
        """Count the update, or the skipped non-finite one; stop after train.max_nonfinite_steps in a row.

        Every engine skips the update when the global gradient norm is not finite (the norm is the
        same on every rank); the ranks then agree on the verdict.
        """
        if not any_rank(not (math.isfinite(loss) and math.isfinite(grad_norm))):
            self.updates, self.bad_in_a_row, self.last_loss = self.updates + 1, 0, loss
            return
        self.bad_in_a_row += 1
        named = {"loss": loss, "gradient norm": grad_norm}
        bad = [f"{name} {value}" for name, value in named.items() if not math.isfinite(value)]
        what = f"step {self.step}: non-finite {' and '.join(bad) or 'loss or gradient norm on another rank'}"
        if math.isfinite(grad_norm):  # a non-finite loss whose gradient was finite: the update was applied
            raise NonFiniteError(f"{what}, and the update was applied; no checkpoint was written after it")
        limit = self.cfg.train.max_nonfinite_steps
        if self.bad_in_a_row <= limit:
            log.warning("%s: update skipped (%d of at most %d in a row)", what, self.bad_in_a_row, limit)
            return
        self.step -= 1  # the weights are still those after the last good update
        path = self.save(self.last_loss)
        raise NonFiniteError(
            f"{what}: update skipped, training stopped ({self.bad_in_a_row} in a row; "
            f"train.max_nonfinite_steps={limit}); the newest checkpoint with finite weights is {path} "
            "(the state before this step; if training had diverged before it, resume an older one with "
            "--resume-from and a lower optim.lr, or set train.max_nonfinite_steps to skip bad steps)"
        )

    def _dense_warmup(self) -> None:
        """Lory: dense until step W, upcycled at the start of step W (megamoe.train.upcycle)."""
        if self.dense_steps > 0 and self.step == self.dense_steps:
            upcycle(self.model, self.engine, self.cfg, self.updates)
            log.info("step %d: dense warm-up done; every expert is now a copy of the dense FFN", self.step)
        self.model.set_dense_phase(self.step < self.dense_steps)

    def evaluate(self) -> dict[str, float]:
        """Validation metrics on the fixed eval slice, split over the data-parallel ranks."""
        tcfg, seq_len, dp = self.cfg.train, self.cfg.model.seq_len, self.groups.dp
        pick = eval_indices if self.blend is None else blend_eval_indices
        batches = rank_share(pick(self.val_split, seq_len, tcfg.micro_batch_size, tcfg.eval_batches), dp.rank, dp.size)
        domains = self.data.domains
        with self.engine.autocast():
            if self.pipeline is None:
                sums = eval_sums(self.model, self.val_split, batches, seq_len, len(domains), self.groups.device)
            else:
                sums = pipeline_eval_sums(self, batches)
        sums = sums.reduced(lambda t: sum_over(t, dp))
        metrics = eval_metrics(sums.loss_D, sums.count_D, domains)
        if self.blend is not None:
            metrics |= blend_eval_metrics(sums.loss_D, sums.count_D, self.blend)
        if sums.routing_KDE.numel():
            routing, self.domain_routing = domain_routing_metrics(
                sums.routing_KDE, sums.count_D, lory_moe_layers(self.cfg), domains
            )
            metrics |= routing
        return metrics

    def save(self, last_loss: float) -> Path:
        """Checkpoint the current step (collective)."""
        meta = {
            **ckpt.architecture(self.cfg),
            "data_key": self.data.manifest["key"],
            "tokens": self.step * self.tokens_per_step,
            "train_loss": last_loss,
            "optimizer_steps": self.updates,
            "layout": self.groups.layout.describe(),
        }
        tcfg = self.cfg.train
        return ckpt.save_checkpoint(
            self.run_dir, self.step, self.model, self.engine, meta, tcfg.keep_checkpoints, self.groups.meshes,
            pinned=tcfg.checkpoint_steps,
        )  # fmt: skip

    def _due(self, interval: int) -> bool:
        """The current step is a multiple of a non-zero interval, or the last step."""
        return self.step == self.cfg.train.max_steps or (interval > 0 and self.step % interval == 0)

    def _throughput(self, steps: int, seconds: float) -> dict[str, float]:
        """tokens/s over all ranks, achieved TFLOP/s per device and model-FLOP utilization."""
        tps = steps * self.tokens_per_step / max(seconds, 1e-9)
        per_device = tps * self.flops_per_token / 1e12 / self.groups.world
        out = {"perf/tokens_per_s": tps, "perf/tflops": per_device}
        if self.peak > 0:
            out["perf/mfu"] = per_device / self.peak
        return out

    def fit(self, preempt: PreemptionFlag | None = None) -> dict:
        """Train to train.max_steps (or until preempted); returns the run summary.

        preempt: a flag installed before the run was set up (so a notice during start-up counts).
        """
        main = self.groups.is_main
        sinks = MetricSinks(self.cfg.logging, self.run_dir, config_to_dict(self.cfg), self.step) if main else None
        self._log_start()
        bar = tqdm(
            total=self.cfg.train.max_steps, initial=self.step, desc="train", unit="step",
            disable=not (main and self.cfg.logging.progress),
        )  # fmt: skip
        started = time.perf_counter()
        try:
            with PreemptionFlag() if preempt is None else contextlib.nullcontext(preempt) as flag:
                last_eval, loss, stopped = self._loop(sinks, bar, flag)
        finally:
            bar.close()
            if sinks is not None:
                sinks.close()
        return self._summary(last_eval, loss, time.perf_counter() - started, stopped)

    def _loop(self, sinks: MetricSinks | None, bar, preempt: PreemptionFlag) -> tuple[dict, float, str | None]:
        """Steps until the end or an agreed preemption; returns (last eval, last loss, signal name)."""
        cfg = self.cfg
        last_eval: dict[str, float] = {}
        loss = float("nan")
        window_start, window_steps = time.perf_counter(), 0
        while self.step < cfg.train.max_steps:
            metrics = self.train_step()
            loss, window_steps = metrics["train/loss"], window_steps + 1
            if sinks is not None and self.health is not None:
                sinks.table(ROUTER_HEALTH_FILE, self.step, self.health_record)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            if self._due(cfg.logging.log_interval):
                metrics |= self._throughput(window_steps, time.perf_counter() - window_start)
                if self.blend is not None:
                    metrics |= share_metrics(self.sampler, self.blend, self.step * cfg.train.global_batch_size)
                window_start, window_steps = time.perf_counter(), 0
                self._record(sinks, metrics)
            if self._due(cfg.train.eval_interval):
                last_eval = self.evaluate()
                self._record(sinks, last_eval)
                if sinks is not None and self.domain_routing is not None:
                    sinks.table(ROUTING_DOMAINS_FILE, self.step, self.domain_routing)
            if self._due(cfg.train.checkpoint_interval) or self.step in cfg.train.checkpoint_steps:
                self.save(loss)
            if any_rank(preempt.raised):
                path = self.save(loss)
                name = preempt.signal_name or "a preemption signal on another rank"
                log.warning("%s: saved %s; continue with `megamoe train %s --resume`", name, path, self.run_dir)
                return last_eval, loss, name
        if not last_eval:  # resumed at the final checkpoint (killed before its summary): metrics.jsonl has it
            last_eval = self.evaluate()
        return last_eval, loss, None

    def _record(self, sinks: MetricSinks | None, metrics: dict[str, float]) -> None:
        """Log metrics to the sinks and a compact line (logging rank only)."""
        if sinks is None:
            return
        sinks.log(self.step, metrics)
        if "eval/loss" in metrics:
            log.info("step %d: eval loss %.4f ppl %.2f", self.step, metrics["eval/loss"], metrics["eval/ppl"])
            return
        mfu = metrics.get("perf/mfu")
        log.info(
            "step %d/%d: loss %.4f lr %.2e grad-norm %.3f %.0f tok/s %.3f TFLOP/s%s",
            self.step, self.cfg.train.max_steps, metrics["train/loss"], metrics["train/lr"],
            metrics["train/grad_norm"], metrics["perf/tokens_per_s"], metrics["perf/tflops"],
            f" MFU {mfu:.1%}" if mfu is not None else "",
        )  # fmt: skip

    def _log_start(self) -> None:
        """One line on what is being trained, where, and how MFU is counted."""
        local = count_parameters(self.model).total
        log.info(
            "run %s | %s on %s | params %.2fM total, %.2fM active, %.2fM on this rank | %.1f MFLOP/token | "
            "peak %.2f TFLOP/s (%s)",
            self.run_dir, self.groups.layout.describe(), self.groups.device, self.counts.total / 1e6,
            self.counts.active / 1e6, local / 1e6, self.flops_per_token / 1e6, self.peak, self.peak_source,
        )  # fmt: skip
        if self.blend is not None:
            samples = self.cfg.train.max_steps * self.cfg.train.global_batch_size
            log.info("%s", describe_blend(self.blend, self.train_split, self.cfg.model.seq_len, samples))

    def _summary(self, last_eval: dict[str, float], loss: float, seconds: float, preempted: str | None) -> dict:
        """Final numbers of the run, also written to <run_dir>/summary.json (rank 0)."""
        summary = {
            "run_dir": str(self.run_dir),
            "step": self.step,
            "tokens": self.step * self.tokens_per_step,
            "train_loss": loss if math.isfinite(loss) else None,  # no step ran: nothing to report
            "seconds": seconds,
            "preempted": preempted,
            "layout": self.groups.layout.describe(),
            "unigram_val_ppl": self.data.manifest["unigram_val_ppl"],
            **last_eval,
        }
        if self.groups.is_main:
            atomic_write_json(self.run_dir / "summary.json", summary)
        return summary
