"""The training loop: accumulate micro-batches, step AdamW, evaluate, checkpoint, log.

Shape legend: B micro-batch, L sequence.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from megamoe.config import Config, config_to_dict
from megamoe.data import PackedSplit, SequenceSampler
from megamoe.errors import DataError
from megamoe.model import build_model
from megamoe.model.params import count_parameters, flops_per_token
from megamoe.train import checkpoint as ckpt
from megamoe.train.evaluate import eval_indices, eval_metrics, eval_sums
from megamoe.train.flops import peak_tflops
from megamoe.train.metrics import MetricSinks
from megamoe.train.optim import build_optimizer, lr_at, set_lr
from megamoe.train.preempt import PreemptionFlag
from megamoe.train.run import RunSetup
from megamoe.utils.fs import atomic_write_json

log = logging.getLogger(__name__)


def pick_device(name: str) -> torch.device:
    """train.device resolved (auto = CUDA when available)."""
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast (auto: on CUDA only), else nothing."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Trainer:
    """One training run on one process."""

    def __init__(self, setup: RunSetup):
        self.cfg: Config = setup.cfg
        self.run_dir: Path = setup.run_dir
        self.data = setup.data
        self.device = pick_device(self.cfg.train.device)
        torch.manual_seed(self.cfg.train.seed)
        self.model = build_model(self.cfg.model, self.cfg.train.seed).to(self.device)
        self.optimizer = build_optimizer(self.model, self.cfg.optim)
        self.train_split, self.val_split = self._splits()
        self.sampler = SequenceSampler(self.train_split.num_sequences(self.cfg.model.seq_len), self.cfg.train.seed)
        self.step = 0
        if setup.resume_from is not None:
            self._resume(setup.resume_from)
        self.counts = count_parameters(self.model)
        self.flops_per_token = flops_per_token(self.cfg.model, self.counts)
        self.peak, self.peak_source = peak_tflops(self.device, self.cfg.logging.peak_tflops)

    def _splits(self) -> tuple[PackedSplit, PackedSplit]:
        """Train and val splits, each holding at least one full sequence."""
        splits = self.data.split("train"), self.data.split("val")
        need = self.cfg.model.seq_len + 1
        for name, split in zip(("train", "val"), splits):
            if split.num_sequences(self.cfg.model.seq_len) == 0:
                raise DataError(
                    f"data: the {name} split of {self.data.root} has {len(split.tokens)} tokens, "
                    f"fewer than one sequence (model.seq_len + 1 = {need}); add documents or shorten model.seq_len"
                )
        return splits

    def _resume(self, path: Path) -> None:
        """Continue from a checkpoint: weights, optimizer, RNG and step."""
        meta = ckpt.load_checkpoint(path, self.model, self.optimizer, dataclasses.asdict(self.cfg.model))
        if meta.get("data_key") != self.data.manifest["key"]:
            log.warning(
                "resume: the data cache key changed (%s -> %s)", meta.get("data_key"), self.data.manifest["key"]
            )
        self.step = int(meta["step"])
        log.info("resumed from %s at step %d", path, self.step)

    @property
    def tokens_per_step(self) -> int:
        """Tokens consumed by one optimizer step."""
        return self.cfg.train.global_batch_size * self.cfg.model.seq_len

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward pass precision context."""
        return autocast_for(self.device, self.cfg.train.precision)

    def train_step(self) -> dict[str, float]:
        """One optimizer step over the global batch (gradient accumulation over micro-batches)."""
        tcfg = self.cfg.train
        lr = lr_at(self.step, self.cfg.optim, tcfg.max_steps)
        set_lr(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        micro = self.sampler.micro_batches(self.step, tcfg.global_batch_size, 0, 1, tcfg.micro_batch_size)
        loss_sum = torch.zeros((), device=self.device)
        for ids in micro:
            batch = self.train_split.batch(ids, self.cfg.model.seq_len)
            with self.autocast():
                out = self.model(batch.tokens_BL.to(self.device), batch.targets_BL.to(self.device))
            loss = out.loss / len(micro)
            loss.backward()
            loss_sum += loss.detach()
        clip = self.cfg.optim.grad_clip or math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.optimizer.step()
        self.step += 1
        return {"train/loss": loss_sum.item(), "train/lr": lr, "train/grad_norm": grad_norm.item()}

    def evaluate(self) -> dict[str, float]:
        """Validation metrics on the fixed eval slice."""
        tcfg, seq_len = self.cfg.train, self.cfg.model.seq_len
        batches = eval_indices(self.val_split, seq_len, tcfg.micro_batch_size, tcfg.eval_batches)
        domains = self.data.domains
        sums = eval_sums(self.model, self.val_split, batches, seq_len, len(domains), self.device, self.autocast())
        return eval_metrics(*sums, domains)

    def save(self, last_loss: float) -> Path:
        """Checkpoint the current step."""
        meta = {
            "model": dataclasses.asdict(self.cfg.model),
            "data_key": self.data.manifest["key"],
            "tokens": self.step * self.tokens_per_step,
            "train_loss": last_loss,
        }
        return ckpt.save_checkpoint(
            self.run_dir, self.step, self.model, self.optimizer, meta, self.cfg.train.keep_checkpoints
        )

    def _due(self, interval: int) -> bool:
        """The current step is a multiple of a non-zero interval, or the last step."""
        return self.step == self.cfg.train.max_steps or (interval > 0 and self.step % interval == 0)

    def _throughput(self, steps: int, seconds: float) -> dict[str, float]:
        """tokens/s and model-FLOP utilization over a window of steps."""
        tps = steps * self.tokens_per_step / max(seconds, 1e-9)
        out = {"perf/tokens_per_s": tps}
        if self.peak > 0:
            out["perf/mfu"] = tps * self.flops_per_token / (self.peak * 1e12)
        return out

    def fit(self) -> dict:
        """Train to train.max_steps (or until preempted); returns the run summary."""
        cfg = self.cfg
        resume_step = self.step if self.step > 0 else None
        sinks = MetricSinks(cfg.logging, self.run_dir, config_to_dict(cfg), resume_step)
        self._log_start()
        bar = tqdm(
            total=cfg.train.max_steps, initial=self.step, disable=not cfg.logging.progress, desc="train", unit="step"
        )
        last_eval: dict[str, float] = {}
        loss = float("nan")
        window_start, window_steps, started = time.perf_counter(), 0, time.perf_counter()
        try:
            with PreemptionFlag() as preempt:
                while self.step < cfg.train.max_steps and not preempt.raised:
                    metrics = self.train_step()
                    loss, window_steps = metrics["train/loss"], window_steps + 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3f}")
                    if self._due(cfg.logging.log_interval):
                        metrics |= self._throughput(window_steps, time.perf_counter() - window_start)
                        window_start, window_steps = time.perf_counter(), 0
                        sinks.log(self.step, metrics)
                        self._log_line(metrics)
                    if self._due(cfg.train.eval_interval):
                        last_eval = self.evaluate()
                        sinks.log(self.step, last_eval)
                        log.info(
                            "step %d: eval loss %.4f ppl %.2f", self.step, last_eval["eval/loss"], last_eval["eval/ppl"]
                        )
                    if self._due(cfg.train.checkpoint_interval):
                        self.save(loss)
                if preempt.raised:
                    path = self.save(loss)
                    log.warning(
                        "%s received: saved %s; continue with `megamoe train %s --resume`",
                        preempt.signal_name,
                        path,
                        self.run_dir,
                    )
        finally:
            bar.close()
            sinks.close()
        return self._summary(last_eval, loss, time.perf_counter() - started, preempt.signal_name)

    def _log_start(self) -> None:
        """One line on what is being trained, where, and how MFU is counted."""
        c = self.counts
        log.info(
            "run %s | %s | params %.2fM total, %.2fM active | %.1f MFLOP/token | peak %.2f TFLOP/s (%s)",
            self.run_dir,
            self.device,
            c.total / 1e6,
            c.active / 1e6,
            self.flops_per_token / 1e6,
            self.peak,
            self.peak_source,
        )

    def _log_line(self, metrics: dict[str, float]) -> None:
        """A compact stdout line for the training metrics."""
        mfu = metrics.get("perf/mfu")
        log.info(
            "step %d/%d: loss %.4f lr %.2e grad-norm %.3f %.0f tok/s%s",
            self.step,
            self.cfg.train.max_steps,
            metrics["train/loss"],
            metrics["train/lr"],
            metrics["train/grad_norm"],
            metrics["perf/tokens_per_s"],
            f" MFU {mfu:.1%}" if mfu is not None else "",
        )

    def _summary(self, last_eval: dict[str, float], loss: float, seconds: float, preempted: str | None) -> dict:
        """Final numbers of the run, also written to <run_dir>/summary.json."""
        summary = {
            "run_dir": str(self.run_dir),
            "step": self.step,
            "tokens": self.step * self.tokens_per_step,
            "train_loss": loss,
            "seconds": seconds,
            "preempted": preempted,
            "unigram_val_ppl": self.data.manifest["unigram_val_ppl"],
            **last_eval,
        }
        atomic_write_json(self.run_dir / "summary.json", summary)
        return summary
