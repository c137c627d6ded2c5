"""The GAN machinery both autoencoder stages share: a diffusers autoencoder trained against a PatchGAN
(seed 001, LDM / VQGAN). Subclasses say how the latent is regularised: KL (kl_autoencoder.py) or
vector quantization (vq_autoencoder.py).

Two networks take turns (manual optimization, :class:`~ldm_lab.stages.base.TrainingStage`): per
micro-batch the generator loss and the discriminator loss (on detached reconstructions) are
backpropagated; both networks step together on accumulation boundaries. ``self.step`` counts
generator steps, which disc_start, the schedules and the EMA follow.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ldm_lab.core.errors import ConfigError
from ldm_lab.evaluation.metrics import ReconstructionMetrics
from ldm_lab.io.model_sources import load_autoencoder
from ldm_lab.losses.autoencoder import AutoencoderLoss
from ldm_lab.nn.downsampling import downsampling
from ldm_lab.nn.ema import ema_with_warmup
from ldm_lab.stages.base import TrainingStage
from ldm_lab.stages.speed import optimizer_options


class AutoencoderStage(TrainingStage):
    """Subclasses implement ``encode_decode`` (training) and ``reconstruct`` (evaluation).
    ``pretrained``: start from these weights (any autoencoder source of ldm_lab/io/model_sources.py, or a hub id;
    its own config wins over ``vae``'s)."""

    monitor, monitor_mode = "val/psnr", "max"
    description = "a first stage: an autoencoder checkpoint (model=vae, vqvae or their tiny variants)"
    adversarial = True

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
        super().__init__(max_steps, accumulate_grad_batches, gradient_clip_val, max_consecutive_nonfinite, seed)
        self.vae = vae() if pretrained is None else load_autoencoder(pretrained, "model.pretrained",
                                                                     pretrained_subfolder, model_class=vae.func)
        if gradient_checkpointing:
            if not self.vae._supports_gradient_checkpointing:
                raise ConfigError(f"{type(self.vae).__name__} has no gradient checkpointing in diffusers; "
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

    # ----------------------------------------------------------------------------- what the tasks ask
    def trained_model(self) -> nn.Module:
        return self.eval_vae

    # ----------------------------------------------------------------------------- properties
    @property
    def downsample_factor(self) -> int:
        return downsampling(self.vae.config)

    def outside_networks(self) -> list[nn.Module]:
        return [self.loss.perceptual] if self.loss.perceptual is not None else []

    @property
    def trained_network(self) -> nn.Module:
        return self.vae

    @property
    def eval_vae(self) -> nn.Module:
        """The weights validation, image logging and export use: the EMA when there is one."""
        return self.ema.module if self.ema is not None else self.vae

    @property
    def last_layer(self) -> torch.Tensor:
        return self.vae.decoder.conv_out.weight

    # ----------------------------------------------------------------------------- optimizers
    def configure_optimizers(self):
        opt_g = self.make_optimizer([p for p in self.vae.parameters() if p.requires_grad], lr=self.lr,
                                    **optimizer_options(self.make_optimizer, self.fused_optimizer))
        opt_d = self.make_disc_optimizer(self.discriminator.parameters(), lr=self.disc_lr,
                                         **optimizer_options(self.make_disc_optimizer, self.fused_optimizer))
        disc_steps = max(1, self.max_steps - self.loss.disc_start)
        return [opt_g, opt_d], [self.make_scheduler(opt_g, num_training_steps=self.max_steps),
                                self.make_scheduler(opt_d, num_training_steps=disc_steps)]

    # ----------------------------------------------------------------------------- the family's part
    def encode_decode(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Training forward pass: (reconstructions, weighted latent regularisation, its parts to log)."""
        raise NotImplementedError

    def reconstruct(self, inputs: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstruction with the evaluation weights."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------- training
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        inputs = self.memory_format(batch["pixel_values"])
        adversarial = self.loss.adversarial_active(self.step)
        reconstructions, reg_loss, reg_logs = self.encode_decode(inputs)

        self.discriminator.requires_grad_(False)  # the generator loss trains the VAE only
        g_loss, logs = self.loss.generator_loss(inputs, reconstructions, reg_loss, self.discriminator,
                                                self.last_layer, self.step)
        self.discriminator.requires_grad_(True)
        logs.update(reg_logs)
        d_loss = None
        if adversarial:
            d_loss, d_logs = self.loss.discriminator_loss(self.discriminator, inputs, reconstructions)
            logs.update(d_logs)
        self.backward_and_step([g_loss, d_loss], logs)

    def on_optimizer_step(self) -> None:
        if self.ema is not None:
            self.ema.update_parameters(self.vae)

    def train_scalars(self) -> dict[str, float]:
        sch_g, sch_d = self.lr_schedulers()
        return {"train/lr": sch_g.get_last_lr()[0], "train/disc_lr": sch_d.get_last_lr()[0]}

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
        self.log_validation(self.validation_values())
