"""The GAN machinery both autoencoder stages share: a diffusers autoencoder trained against a PatchGAN
(seed 001, LDM / VQGAN). Subclasses say how the latent is regularised: KL (kl_autoencoder.py) or
vector quantization (vq_autoencoder.py).

Manual optimization, because two networks take turns: per micro-batch the generator loss and the
discriminator loss (on detached reconstructions) are backpropagated, scaled by 1/accumulation; every
``accumulate_grad_batches`` micro-batches both networks are clipped and stepped. Everything that
counts training progress (disc_start, the schedules, EMA, logging, stopping) counts *generator
optimizer steps*, not Lightning's ``global_step``, which moves once per optimizer.
"""

from __future__ import annotations

import functools
import logging
from collections import defaultdict
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import nn

from ldm_lab.losses.autoencoder import AutoencoderLoss
from ldm_lab.metrics import ReconstructionMetrics
from ldm_lab.nn.ema import ema_with_warmup
from ldm_lab.nn.pretrained import build_or_load

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row; a checkpoint was written before stopping."""


class AutoencoderStage(L.LightningModule):
    """Subclasses implement ``encode_decode`` (training), ``reconstruct`` (evaluation) and
    ``sample_latents`` (what a latent diffusion model would be trained on)."""

    def __init__(
        self,
        vae: functools.partial,
        discriminator: functools.partial,
        loss: AutoencoderLoss,
        optimizer: functools.partial,
        disc_optimizer: functools.partial,
        scheduler: functools.partial,
        metrics: functools.partial,
        lr: float,
        disc_lr: float,
        max_steps: int,
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = 1.0,
        gradient_checkpointing: bool = False,
        ema_decay: float | None = 0.9999,
        pretrained: str | None = None,
        pretrained_subfolder: str | None = None,
        decoder_only: bool = False,
        max_consecutive_nonfinite: int = 5,
        seed: int = 0,
    ):
        super().__init__()
        self.automatic_optimization = False
        self.vae = build_or_load(vae, pretrained, pretrained_subfolder)
        if gradient_checkpointing:
            if not self.vae._supports_gradient_checkpointing:
                raise ValueError(f"{type(self.vae).__name__} has no gradient checkpointing in diffusers; "
                                 f"set model.gradient_checkpointing=false")
            self.vae.enable_gradient_checkpointing()
        if decoder_only:  # sd-vae-ft-mse: the latent space stays put, only the decoder learns
            self.vae.encoder.requires_grad_(False)
            if self.vae.quant_conv is not None:
                self.vae.quant_conv.requires_grad_(False)
        # Built after the VAE, so every discriminator choice of a sweep starts from the same VAE weights.
        self.discriminator: nn.Module = discriminator()
        self.loss = loss
        self.ema = ema_with_warmup(self.vae, ema_decay) if ema_decay else None
        self.val_metrics: ReconstructionMetrics = metrics(lpips_model=loss.perceptual)
        self.make_optimizer, self.make_disc_optimizer, self.make_scheduler = optimizer, disc_optimizer, scheduler
        self.lr, self.disc_lr = lr, disc_lr
        self.max_steps = max_steps
        self.accumulate_grad_batches = accumulate_grad_batches
        self.gradient_clip_val = gradient_clip_val
        self.max_consecutive_nonfinite = max_consecutive_nonfinite
        self.seed = seed
        # Progress, saved in and restored from checkpoints.
        self.gen_step = 0  # generator optimizer steps
        self.micro_step = 0  # micro-batches seen
        self.nonfinite_skipped = 0  # micro-batches skipped for a non-finite loss
        # Within one accumulation cycle.
        self._consecutive_nonfinite = 0
        self._contributed = 0
        self._log_sums: dict[str, torch.Tensor | float] = defaultdict(float)
        self.last_val_metrics: dict[str, float] = {}
        self.run_config: dict | None = None  # the composed model/disc config, stored in checkpoints

    # ----------------------------------------------------------------------------- properties
    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def eval_vae(self) -> nn.Module:
        """The weights validation, image logging and export use: the EMA when there is one."""
        return self.ema.module if self.ema is not None else self.vae

    @property
    def last_layer(self) -> torch.Tensor:
        return self.vae.decoder.conv_out.weight

    # ----------------------------------------------------------------------------- optimizers
    def configure_optimizers(self):
        opt_g = self.make_optimizer([p for p in self.vae.parameters() if p.requires_grad], lr=self.lr)
        opt_d = self.make_disc_optimizer(self.discriminator.parameters(), lr=self.disc_lr)
        disc_steps = max(1, self.max_steps - self.loss.disc_start)
        return [opt_g, opt_d], [self.make_scheduler(opt_g, num_training_steps=self.max_steps),
                                self.make_scheduler(opt_d, num_training_steps=disc_steps)]

    def on_fit_start(self) -> None:
        if self.trainer.precision == "16-mixed":
            raise ValueError("precision 16-mixed clips scaled gradients under manual optimization; "
                             "use precision=bf16 (bf16-mixed) or precision=fp32")

    # ----------------------------------------------------------------------------- the family's part
    def encode_decode(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Training forward pass: (reconstructions, weighted latent regularisation, its parts to log)."""
        raise NotImplementedError

    def reconstruct(self, inputs: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstruction with the evaluation weights."""
        raise NotImplementedError

    def sample_latents(self, inputs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The latents a diffusion model trains on, from the evaluation weights."""
        raise NotImplementedError

    def on_generator_step(self) -> None:
        """Called after every generator optimizer step (the VQ stage restarts dead codes here)."""

    def step_generator(self, device: torch.device) -> torch.Generator:
        """Randomness for this micro-batch from (seed, rank, micro-batch): repeatable, unchanged by a resume."""
        seed = np.random.SeedSequence([self.seed, self.global_rank, self.micro_step]).generate_state(1)[0]
        return torch.Generator(device=device).manual_seed(int(seed))

    # ----------------------------------------------------------------------------- training
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        inputs = batch["pixel_values"]
        adversarial = self.loss.adversarial_active(self.gen_step)
        reconstructions, reg_loss, reg_logs = self.encode_decode(inputs)

        self.discriminator.requires_grad_(False)  # the generator loss trains the VAE only
        g_loss, logs = self.loss.generator_loss(inputs, reconstructions, reg_loss, self.discriminator,
                                                self.last_layer, self.gen_step)
        self.discriminator.requires_grad_(True)
        logs.update(reg_logs)
        d_loss = None
        if adversarial:
            d_loss, d_logs = self.loss.discriminator_loss(self.discriminator, inputs, reconstructions)
            logs.update(d_logs)

        self.micro_step += 1
        if self._all_ranks_finite(g_loss if d_loss is None else g_loss + d_loss):
            self.manual_backward(g_loss / self.accumulate_grad_batches)
            if d_loss is not None:
                self.manual_backward(d_loss / self.accumulate_grad_batches)
            self._consecutive_nonfinite = 0
            self._contributed += 1
            for name, value in logs.items():  # tensors: no device sync until they are logged
                self._log_sums[name] = self._log_sums[name] + value
        else:
            self._skip_nonfinite(logs)
        if self.micro_step % self.accumulate_grad_batches == 0:
            self._optimizer_step(adversarial)
        self.log("loss", logs["total"], prog_bar=True, logger=False)
        self.log("step", float(self.gen_step), prog_bar=True, logger=False)

    def _all_ranks_finite(self, loss: torch.Tensor) -> bool:
        """Whether the loss is finite on every rank: under DDP all ranks must skip a micro-batch together,
        or the ones that backpropagate wait forever for the gradients of the ones that do not."""
        nonfinite = (~torch.isfinite(loss.detach())).float()
        return not bool(self.trainer.strategy.reduce(nonfinite, reduce_op="sum") > 0)

    def _skip_nonfinite(self, logs: dict[str, torch.Tensor]) -> None:
        self.nonfinite_skipped += 1
        self._consecutive_nonfinite += 1
        parts = ", ".join(f"{k}={float(v):.4g}" for k, v in logs.items())
        log.warning("non-finite loss at generator step %d skipped (%d so far): %s", self.gen_step,
                    self.nonfinite_skipped, parts)
        if self._consecutive_nonfinite >= self.max_consecutive_nonfinite:
            callback = self.trainer.checkpoint_callback
            folder = Path(callback.dirpath) if callback is not None else Path(self.trainer.default_root_dir)
            path = folder / "nonfinite.ckpt"
            self.trainer.save_checkpoint(path)
            raise NonFiniteLossError(
                f"{self._consecutive_nonfinite} non-finite losses in a row at generator step {self.gen_step} "
                f"({parts}); state saved to {path}. Lower model.lr, check the data, or use precision=fp32."
            )

    def _optimizer_step(self, adversarial: bool) -> None:
        opt_g, opt_d = self.optimizers()
        sch_g, sch_d = self.lr_schedulers()
        if self._contributed == 0:  # every micro-batch of this cycle was skipped: nothing to apply
            opt_g.zero_grad(set_to_none=True)
            opt_d.zero_grad(set_to_none=True)
            return
        self._step(opt_g, sch_g)
        if adversarial:
            self._step(opt_d, sch_d)
        self.gen_step += 1
        if self.ema is not None:
            self.ema.update_parameters(self.vae)
        self.on_generator_step()
        self._log_train_scalars(sch_g, sch_d)
        if self.gen_step >= self.max_steps:
            self.trainer.should_stop = True

    def _step(self, optimizer, scheduler) -> None:
        if self.gradient_clip_val:
            self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()

    def _log_train_scalars(self, sch_g, sch_d) -> None:
        count, sums = self._contributed, self._log_sums
        self._contributed, self._log_sums = 0, defaultdict(float)
        if self.logger is None or self.gen_step % self.trainer.log_every_n_steps:
            return
        metrics = {f"train/{name}": float(value) / count for name, value in sums.items()}
        metrics.update({"train/lr": sch_g.get_last_lr()[0], "train/disc_lr": sch_d.get_last_lr()[0],
                        "train/nonfinite_skipped": self.nonfinite_skipped})
        self.logger.log_metrics(metrics, step=self.gen_step)

    # ----------------------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        self.val_metrics.to(self.device).reset()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        inputs = batch["pixel_values"]
        self.val_metrics.update(inputs, self.reconstruct(inputs))

    def validation_values(self) -> dict[str, torch.Tensor]:
        """The metrics of a validation pass; subclasses add their own."""
        return self.val_metrics.compute()

    def on_validation_epoch_end(self) -> None:
        values = self.validation_values()
        for name, value in values.items():  # for the progress bar and ModelCheckpoint's monitor
            self.log(f"val/{name}", value, prog_bar=name == "psnr", logger=False)
        self.last_val_metrics = {name: float(value) for name, value in values.items()}
        if self.logger is not None:
            self.logger.log_metrics({f"val/{k}": v for k, v in self.last_val_metrics.items()}, step=self.gen_step)

    # ----------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["ldm_lab"] = {
            "gen_step": self.gen_step,
            "micro_step": self.micro_step,
            "nonfinite_skipped": self.nonfinite_skipped,
            "config": self.run_config,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["ldm_lab"]
        self.gen_step = state["gen_step"]
        self.micro_step = state["micro_step"]
        self.nonfinite_skipped = state["nonfinite_skipped"]
