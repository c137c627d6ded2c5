"""What a latent diffusion model learns, apart from its network (as DiT's ``diffusion.training_losses``): each
objective gives the training loss on clean latents and the scheduler its samples are drawn with (what exports
hold; ldm_lab/diffusion/sampling.py derives each sampler from it). ``model/objective=ddpm`` (the default) or
``rectified_flow`` (conf/model/objective/).

``predict`` is the denoiser's call, (noisy latents, timesteps (N,)) -> prediction (ldm_lab/nn/denoisers.py), with
the batch's class labels bound in. Both objectives show the network timesteps on one scale, 0-1000."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_snr

from ldm_lab.config.errors import ConfigError
from ldm_lab.diffusion.guidance import Predict

WEIGHTING_SCHEMES = ("uniform", "logit_normal")


def _timestep_density(density: dict | None, default: str) -> dict:
    """``model.objective.timestep_density``: diffusers' ``compute_density_for_timestep_sampling`` arguments
    (logit_normal: mean 0 and std 1 unless given)."""
    density = {"logit_mean": 0.0, "logit_std": 1.0, **(density or {"weighting_scheme": default})}
    if density["weighting_scheme"] not in WEIGHTING_SCHEMES:
        raise ConfigError(f"model.objective.timestep_density.weighting_scheme={density['weighting_scheme']}: use one "
                          f"of {', '.join(WEIGHTING_SCHEMES)}")
    return density


def _training_times(density: dict, latents: torch.Tensor, generator: torch.Generator, training: bool) -> torch.Tensor:
    """Times in [0, 1), one per image: from ``density`` in training, uniform in validation (so its loss compares
    across runs of other densities)."""
    if training and density["weighting_scheme"] != "uniform":
        return compute_density_for_timestep_sampling(batch_size=len(latents), device=latents.device,
                                                     generator=generator, **density)
    return torch.rand(len(latents), generator=generator, device=latents.device)


class DDPM:
    """Denoising diffusion (Ho et al. 2020; LDM's objective): a diffusers ``noise_scheduler`` holds the betas and
    the prediction type (epsilon, or v_prediction, Salimans & Ho 2022), the loss is the MSE between prediction and
    target at a timestep drawn from ``timestep_density`` (uniform, LDM's loss_simple, or logit_normal: 1000 x
    sigmoid(N(logit_mean, logit_std)), Esser et al. 2024). ``snr_gamma``: min-SNR-gamma weighting (Hang et al.
    2023), min(SNR, gamma) / SNR for epsilon and min(SNR, gamma) / (SNR + 1) for v; validation reports the
    unweighted loss_simple at uniform timesteps. ``ddim``: the DDIM spacing sampling and the export use."""

    validation_loss = "loss_simple"

    def __init__(self, noise_scheduler: SchedulerMixin, timestep_density: dict | None = None,
                 snr_gamma: float | None = None, ddim: dict | None = None):
        config = noise_scheduler.config
        if config.get("rescale_betas_zero_snr") and config.prediction_type == "epsilon":
            raise ConfigError("model.objective.noise_scheduler.rescale_betas_zero_snr=true makes the last timestep pure "
                              "noise, where the noise is no target to learn (Lin et al. 2024): set "
                              "model.objective.noise_scheduler.prediction_type=v_prediction")
        self.noise_scheduler = noise_scheduler
        self.timestep_density = _timestep_density(timestep_density, "uniform")
        self.snr_gamma = snr_gamma
        self.ddim = dict(ddim or {})

    @property
    def training_loss(self) -> str:
        """The name training logs its loss under: loss_simple only for LDM's uniform, unweighted loss."""
        name = "loss_simple" if self.snr_gamma is None else "loss_min_snr"
        scheme = self.timestep_density["weighting_scheme"]
        return name if scheme == "uniform" else f"{name}_{scheme}"

    @property
    def sampling_scheduler(self) -> DDIMScheduler:
        """The training betas with the DDIM spacing ``ddim``."""
        return DDIMScheduler.from_config(self.noise_scheduler.config, **self.ddim)

    def loss(self, predict: Predict, latents: torch.Tensor, generator: torch.Generator,
             training: bool = False) -> torch.Tensor:
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        num_train_timesteps = self.noise_scheduler.config.num_train_timesteps
        if training and self.timestep_density["weighting_scheme"] != "uniform":
            density = compute_density_for_timestep_sampling(batch_size=len(latents), device=latents.device,
                                                            generator=generator, **self.timestep_density)
            timesteps = (density * num_train_timesteps).long().clamp(max=num_train_timesteps - 1)
        else:
            timesteps = torch.randint(0, num_train_timesteps, (len(latents),), generator=generator,
                                      device=latents.device)
        prediction = predict(self.noise_scheduler.add_noise(latents, noise, timesteps), timesteps)
        v_prediction = self.noise_scheduler.config.prediction_type == "v_prediction"
        target = self.noise_scheduler.get_velocity(latents, noise, timesteps) if v_prediction else noise
        if not training or self.snr_gamma is None:
            return F.mse_loss(prediction.float(), target.float())
        snr = compute_snr(self.noise_scheduler, timesteps)
        weight = snr.clamp(max=self.snr_gamma) / (snr + 1 if v_prediction else snr)
        return (F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3)) * weight).mean()


class RectifiedFlow:
    """Rectified flow (Liu et al. 2022; SD3, Esser et al. 2024): x_t = (1 - t) x0 + t noise on a straight line, the
    network predicts its velocity noise - x0, t from ``timestep_density`` (logit_normal(0, 1) by default: SD3's
    study ranked it first of 61 variants) and shown to the network as 1000 t. Sampled by diffusers'
    ``FlowMatchEulerDiscreteScheduler`` (or Heun) from t = 1 down. ``shift`` warps the sampling times
    (shift t / (1 + (shift - 1) t)); SD3 published 3.0 for its large images, 1 here: training from scratch, the
    times sampling walks are those training drew (the shift does not touch training's t)."""

    validation_loss = "loss_flow"

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, timestep_density: dict | None = None):
        if shift <= 0:
            raise ConfigError(f"model.objective.shift={shift}: must be above 0 (1: no shift)")
        self.num_train_timesteps, self.shift = num_train_timesteps, shift
        self.timestep_density = _timestep_density(timestep_density, "logit_normal")

    @property
    def training_loss(self) -> str:
        scheme = self.timestep_density["weighting_scheme"]
        return "loss_flow" if scheme == "uniform" else f"loss_flow_{scheme}"

    @property
    def sampling_scheduler(self) -> FlowMatchEulerDiscreteScheduler:
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.num_train_timesteps, shift=self.shift)

    def loss(self, predict: Predict, latents: torch.Tensor, generator: torch.Generator,
             training: bool = False) -> torch.Tensor:
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        t = _training_times(self.timestep_density, latents, generator, training)
        t_image = t.to(latents.dtype)[:, None, None, None]
        prediction = predict((1 - t_image) * latents + t_image * noise, t * self.num_train_timesteps)
        return F.mse_loss(prediction.float(), (noise - latents).float())
