"""The training loop every stage shares: manual optimization with gradient accumulation, clipping,
non-finite skipping, seeded per-micro-batch randomness and progress counters that survive a resume.
Under DDP, gradients are all-reduced once per optimizer step, in the backward of the cycle's last
micro-batch (Lightning's ``block_backward_sync`` for the others), not once per micro-batch.

Per micro-batch a stage computes one loss per optimizer (``None`` for an optimizer that sits this one
out) and hands them to :meth:`TrainingStage.backward_and_step`. Everything that counts progress
(schedules, EMA, logging, stopping, disc_start) counts *optimizer steps* of the first optimizer,
``self.step``, not Lightning's ``global_step``, which moves once per optimizer (twice per batch for a GAN).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

import lightning as L
import numpy as np
import torch
from diffusers import DiffusionPipeline
from lightning.pytorch.strategies import ParallelStrategy

from ldm_lab.core.errors import ConfigError
from ldm_lab.io.checkpoints import check_resume_kind, nonfinite_tensors

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row; a checkpoint was written before stopping."""


class NonFiniteValidationError(RuntimeError):
    """A validation value or a weight is not finite; nothing was written after it."""


class TrainingStage(L.LightningModule):
    """Subclasses build their networks, optimizers (first one: the model the stage is named after) and
    ``training_step``; they may extend :meth:`on_optimizer_step` and :meth:`train_scalars`.
    ``monitor`` / ``monitor_mode`` name the validation value the best checkpoint is chosen on;
    ``description`` says what the stage is in the words of its model option (for error messages);
    ``adversarial`` whether it trains against the ``disc`` discriminator.

    What the tasks ask of a stage, so that a new stage is one new class: a batch for the memory plan
    (:meth:`planning_batch`), whether a checkpoint resumes it (:meth:`check_resume`),
    the data it needs (:meth:`attach_data`) and its trained model (:meth:`trained_model`: what the image logger
    draws, the export writes and task=train samples)."""

    monitor: str
    monitor_mode: str
    description = "a training stage"
    adversarial = False

    def __init__(self, max_steps: int, accumulate_grad_batches: int = 1, gradient_clip_val: float | None = 1.0,
                 max_consecutive_nonfinite: int = 5, seed: int = 0):
        super().__init__()
        self.automatic_optimization = False
        self.max_steps = max_steps
        self.accumulate_grad_batches = accumulate_grad_batches
        self.gradient_clip_val = gradient_clip_val
        self.max_consecutive_nonfinite = max_consecutive_nonfinite
        self.seed = seed
        # Progress, saved in and restored from checkpoints.
        self.step = 0  # optimizer steps
        self.micro_step = 0  # micro-batches seen
        self.nonfinite_skipped = 0  # micro-batches skipped for a non-finite loss
        # Within one accumulation cycle.
        self._consecutive_nonfinite = 0
        self._contributed = 0
        self._gradients_synced = True  # whether DDP all-reduced the gradients accumulated so far
        self._log_sums: dict[str, torch.Tensor | float] = defaultdict(float)
        self.last_val_metrics: dict[str, float] = {}
        self.run_config: dict | None = None  # the composed config this stage was built from, stored in checkpoints
        self.channels_last = False  # speed options (ldm_lab/stages/speed.py)
        self.fused_optimizer = False

    def on_fit_start(self) -> None:
        if self.trainer.precision == "16-mixed":
            raise ConfigError("precision 16-mixed clips scaled gradients under manual optimization; "
                              "use precision=bf16 (bf16-mixed) or precision=fp32")

    def on_train_batch_start(self, batch, batch_idx: int) -> int | None:
        """Train no step past ``max_steps``: a resumed finished run, or ``max_steps=0``, stops at once."""
        if self.step >= self.max_steps:
            self.trainer.should_stop = True
            return -1  # Lightning: skip this batch and end the epoch
        return None

    # ----------------------------------------------------------------------------- what the tasks ask
    def planning_batch(self, batch_size: int, side: int) -> dict[str, torch.Tensor]:
        """A random training batch of ``side`` x ``side`` images, for the memory plan."""
        return {"pixel_values": torch.rand(batch_size, 3, side, side) * 2 - 1}

    def check_resume(self, checkpoint: dict, path: str | Path) -> None:
        """Before Lightning loads ``checkpoint`` (read from ``path``): a clear refusal instead of a silent
        mismatch; a stage of another kind, or another number of micro-batches per step (the step's average and
        where its cycles start), is refused here, subclasses refuse what else would not match."""
        check_resume_kind(checkpoint, path, self)
        trained = checkpoint["ldm_lab"]["config"]["model"].get("accumulate_grad_batches", 1)
        if trained != self.accumulate_grad_batches:
            raise ConfigError(f"ckpt_path={path} was trained with model.accumulate_grad_batches={trained}, this run "
                              f"gives {self.accumulate_grad_batches}: resume with model.accumulate_grad_batches="
                              f"{trained}, or start a new run from its weights: model.pretrained={path} (an "
                              f"autoencoder) or model.denoiser_pretrained={path} (a latent diffusion model)")

    def attach_data(self, datamodule, latent_cache_root: str | Path) -> None:
        """Before training: prepare what the stage reads from ``datamodule`` beyond its pixels."""

    def trained_model(self) -> torch.nn.Module | DiffusionPipeline:
        """The trained model as diffusers holds it, with its evaluation weights: what the export writes
        (ldm_lab/io/export.py ``export_model``), as task=export reads it from a checkpoint."""
        raise NotImplementedError

    @property
    def trained_network(self) -> torch.nn.Module:
        """The network the stage is named after (what ``speed.compile`` compiles)."""
        raise NotImplementedError

    def averaged_networks(self) -> list[torch.nn.Module]:
        """The weight averages (EMAs) the stage keeps beside its networks: what task=plan counts as EMA."""
        ema = getattr(self, "ema", None)
        return [ema] if ema is not None else []

    def outside_networks(self) -> list[torch.nn.Module]:
        """Frozen networks the stage runs but keeps out of its module tree, so out of its checkpoints (LPIPS, REPA's
        image encoder): what task=plan counts with the weights."""
        return []

    def memory_format(self, batch: torch.Tensor) -> torch.Tensor:
        """A batch in the networks' memory format (channels-last when ``speed.channels_last``)."""
        return batch.contiguous(memory_format=torch.channels_last) if self.channels_last else batch

    def step_generator(self, device: torch.device | str) -> torch.Generator:
        """Randomness for this micro-batch from (seed, rank, micro-batch): repeatable, unchanged by a resume."""
        seed = np.random.SeedSequence([self.seed, self.global_rank, self.micro_step]).generate_state(1)[0]
        return torch.Generator(device=device).manual_seed(int(seed))

    # ----------------------------------------------------------------------------- the loop
    def backward_and_step(self, losses: list[torch.Tensor | None], logs: dict[str, torch.Tensor]) -> None:
        """Backpropagate ``losses[i] / accumulation`` for optimizer i and, every ``accumulate_grad_batches``
        micro-batches, clip and step the optimizers whose loss was given. A micro-batch whose losses are
        not all finite (on any rank) is skipped and counted."""
        given = [loss for loss in losses if loss is not None]
        self.micro_step += 1
        ends_cycle = self.micro_step % self.accumulate_grad_batches == 0
        if self._all_ranks_finite(torch.stack([loss.detach().float() for loss in given]).sum()):
            strategy = self.trainer.strategy
            blocked = not ends_cycle and isinstance(strategy, ParallelStrategy)
            with strategy.block_backward_sync() if blocked else nullcontext():
                for loss in given:
                    self.manual_backward(loss / self.accumulate_grad_batches)
            self._gradients_synced = not blocked
            self._consecutive_nonfinite = 0
            self._contributed += 1
            for name, value in logs.items():  # tensors: no device sync until they are logged
                self._log_sums[name] = self._log_sums[name] + value
        else:
            self._skip_nonfinite(logs)
        if ends_cycle:
            self._optimizer_step([loss is not None for loss in losses])
        self.log("loss", losses[0].detach(), prog_bar=True, logger=False)
        self.log("step", float(self.step), prog_bar=True, logger=False)

    def _all_ranks_finite(self, loss: torch.Tensor) -> bool:
        """Whether the loss is finite on every rank: under DDP all ranks must skip a micro-batch together,
        or the ones that backpropagate wait forever for the gradients of the ones that do not."""
        nonfinite = (~torch.isfinite(loss)).float()
        return not bool(self.trainer.strategy.reduce(nonfinite, reduce_op="sum") > 0)

    def _skip_nonfinite(self, logs: dict[str, torch.Tensor]) -> None:
        self.nonfinite_skipped += 1
        self._consecutive_nonfinite += 1
        parts = ", ".join(f"{k}={float(v):.4g}" for k, v in logs.items())
        log.warning("non-finite loss at step %d skipped (%d so far): %s", self.step, self.nonfinite_skipped, parts)
        if self._consecutive_nonfinite >= self.max_consecutive_nonfinite:
            callback = self.trainer.checkpoint_callback
            folder = Path(callback.dirpath) if callback is not None else Path(self.trainer.default_root_dir)
            path = folder / "nonfinite.ckpt"
            self.trainer.save_checkpoint(path)
            raise NonFiniteLossError(
                f"{self._consecutive_nonfinite} non-finite losses in a row at step {self.step} "
                f"({parts}); state saved to {path}. Lower model.lr, check the data, or use precision=fp32."
            )

    def _optimizer_step(self, active: list[bool]) -> None:
        optimizers, lr_schedules = _as_list(self.optimizers()), _as_list(self.lr_schedulers())
        if self._contributed == 0:  # every micro-batch of this cycle was skipped: nothing to apply
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            return
        if not self._gradients_synced:
            self._all_reduce_gradients()
        for optimizer, lr_schedule, is_active in zip(optimizers, lr_schedules, active, strict=True):
            if is_active:
                if self.gradient_clip_val:
                    self._clip_gradients(optimizer)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                lr_schedule.step()
        self.step += 1
        self.on_optimizer_step()
        self._log_train_scalars()
        if self.step >= self.max_steps:
            self.trainer.should_stop = True

    def _clip_gradients(self, optimizer) -> None:
        """Clip the optimizer's gradients to a total norm of ``gradient_clip_val``. By hand: Lightning's
        ``clip_gradients`` refuses, under bf16-mixed, the fused AdamW that ``speed.fused_adamw`` gives on CUDA
        (an optimizer that could unscale fp16 gradients itself), though bf16 scales nothing; 16-mixed, whose
        gradients are scaled, is refused in ``on_fit_start``."""
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(parameters, self.gradient_clip_val)

    def _all_reduce_gradients(self) -> None:
        """Average the accumulated gradients over ranks by hand: the cycle's last micro-batch, whose backward
        would have done it, was skipped (on every rank, so every rank gets here)."""
        world_size = self.trainer.world_size
        for parameter in self.parameters():
            if parameter.grad is not None:
                torch.distributed.all_reduce(parameter.grad)
                parameter.grad /= world_size
        self._gradients_synced = True

    def on_optimizer_step(self) -> None:
        """Called after every optimizer step (EMA updates, dead-code restarts)."""

    def train_scalars(self) -> dict[str, float]:
        """Scalars logged with the averaged training losses: the learning rate(s)."""
        return {"train/lr": _as_list(self.lr_schedulers())[0].get_last_lr()[0]}

    def _log_train_scalars(self) -> None:
        count, sums = self._contributed, self._log_sums
        self._contributed, self._log_sums = 0, defaultdict(float)
        if not self.loggers or self.step % self.trainer.log_every_n_steps:
            return
        metrics = {f"train/{name}": float(value) / count for name, value in sums.items()}
        metrics.update(self.train_scalars())
        metrics["train/nonfinite_skipped"] = self.nonfinite_skipped
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.step)

    # ----------------------------------------------------------------------------- validation logging
    def log_validation(self, values: dict[str, torch.Tensor]) -> None:
        """Values of a validation pass: to the progress bar, ModelCheckpoint's monitor and the logger.
        A NaN value or a non-finite weight stops the run here, before any checkpoint or export is written."""
        self._check_finite(values)
        for name, value in values.items():
            self.log(f"val/{name}", value, prog_bar=f"val/{name}" == self.monitor, logger=False)
        self.last_val_metrics = {name: float(value) for name, value in values.items()}
        for logger in self.loggers:
            logger.log_metrics({f"val/{k}": v for k, v in self.last_val_metrics.items()}, step=self.step)

    def _check_finite(self, values: dict[str, torch.Tensor]) -> None:
        # NaN, not infinity: a perfect reconstruction's PSNR is +inf
        bad = [f"val/{name} = {float(value)}" for name, value in values.items() if math.isnan(float(value))]
        weights = nonfinite_tensors(dict(self.named_parameters()))
        if weights:
            bad.append(f"{len(weights)} weight tensors ({', '.join(weights[:3])}{', ...' if len(weights) > 3 else ''})")
        if bad:
            raise NonFiniteValidationError(
                f"validation at step {self.step}: non-finite {'; '.join(bad)}. The run stops before writing a "
                f"checkpoint or the export; checkpoints/last.ckpt holds the previous validation. Lower model.lr, "
                f"check the data, or use precision=fp32, then resume from it")

    # ----------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["ldm_lab"] = {
            "step": self.step,
            "micro_step": self.micro_step,
            "nonfinite_skipped": self.nonfinite_skipped,
            "config": self.run_config,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["ldm_lab"]
        self.step = state["step"]
        self.micro_step = state["micro_step"]
        self.nonfinite_skipped = state["nonfinite_skipped"]


def _as_list(value) -> list:
    """Lightning returns a lone optimizer (scheduler) bare, several as a list."""
    return list(value) if isinstance(value, list | tuple) else [value]
