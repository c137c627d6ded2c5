"""What a latent diffusion model learns, apart from its network (as DiT's ``diffusion.training_losses``): each
objective gives the training loss on clean latents, the scheduler an export holds, and the samplers its models
are drawn with (``sample.sampler``). ``model/objective=ddpm`` (the default) or ``rectified_flow``
(conf/model/objective/); a new objective is one subclass of :class:`Objective` here and one config.

``predict`` is the denoiser's call, (noisy latents, timesteps (N,)) -> prediction (ldm_lab/diffusion/pipeline.py),
with the batch's class labels bound in. Both objectives show the network timesteps on one scale, 0-1000."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_snr

from ldm_lab.core.errors import ConfigError
from ldm_lab.diffusion.pipeline import Predict

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


class Objective:
    """An objective: its ``name`` (what a pipeline's config records) and its samplers, ``sample.sampler`` names
    for scheduler classes (the first is ``auto``'s)."""

    name: ClassVar[str]
    samplers: ClassVar[dict[str, type[SchedulerMixin]]]
    validation_loss: ClassVar[str]

    @classmethod
    def sampler_scheduler(cls, config, sampler: str = "auto") -> SchedulerMixin:
        """The ``sampler`` scheduler built from a model's scheduler ``config``; a sampler of another objective is
        refused by name."""
        sampler = next(iter(cls.samplers)) if sampler == "auto" else sampler
        if sampler not in cls.samplers:
            known = sorted(name for objective in Objective.__subclasses__() for name in objective.samplers)
            why = "is no sampler" if sampler not in known else "samples models of another objective"
            raise ConfigError(f"sample.sampler={sampler} {why}: this model was trained with model/objective={cls.name}, "
                              f"which samples with {' or '.join(cls.samplers)} (or auto: {next(iter(cls.samplers))})")
        return cls.samplers[sampler].from_config(config)

    def less_noisy(self, latents: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor, interval: float,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``noisy`` (``latents`` noised at ``timesteps``) moved to earlier timesteps with the same noise: t' = t
        minus a uniform share of ``interval`` x the training timesteps, at least 0 (SRA's teacher input, Jiang et
        al. 2025). Returns the new noisy latents and timesteps."""
        raise NotImplementedError

    @staticmethod
    def scheduler_names() -> list[str]:
        """The scheduler classes some objective samples with, by name."""
        return [scheduler.__name__ for objective in Objective.__subclasses__() for scheduler in objective.samplers.values()]

    @staticmethod
    def named(name: str | None, scheduler: SchedulerMixin) -> type[Objective]:
        """The objective a pipeline records (``name``), or for a folder that cannot record it (an ``LDMPipeline``'s),
        the one whose samplers include its ``scheduler``'s class."""
        for objective in Objective.__subclasses__():
            if objective.name == name or (name is None and type(scheduler) in objective.samplers.values()):
                return objective
        raise ConfigError(f"a pipeline of objective {name!r} with a {type(scheduler).__name__}: the lab samples "
                          f"{', '.join(o.name for o in Objective.__subclasses__())} models")


class DDPM(Objective):
    """Denoising diffusion (Ho et al. 2020; LDM's objective): a diffusers ``noise_scheduler`` holds the betas and
    the prediction type (epsilon, or v_prediction, Salimans & Ho 2022), the loss is the MSE between prediction and
    target at a timestep drawn from ``timestep_density`` (uniform, LDM's loss_simple, or logit_normal: 1000 x
    sigmoid(N(logit_mean, logit_std)), Esser et al. 2024). ``snr_gamma``: min-SNR-gamma weighting (Hang et al.
    2023), min(SNR, gamma) / SNR for epsilon and min(SNR, gamma) / (SNR + 1) for v; validation reports the
    unweighted loss_simple at uniform timesteps. ``ddim``: the DDIM spacing sampling and the export use."""

    name = "ddpm"
    samplers = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}
    validation_loss = "loss_simple"

    @classmethod
    def sampler_scheduler(cls, config, sampler: str = "auto") -> SchedulerMixin:
        """DDIM keeps the export's spacing (``steps_offset``, ``set_alpha_to_one``); DDPM walks every step down to 0."""
        scheduler = super().sampler_scheduler(config, sampler)
        return DDPMScheduler.from_config(config, steps_offset=0) if isinstance(scheduler, DDPMScheduler) else scheduler

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


    def less_noisy(self, latents: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor, interval: float,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        steps = self.noise_scheduler.config.num_train_timesteps
        shift = torch.rand(len(timesteps), generator=generator, device=generator.device).to(timesteps.device)
        earlier = (timesteps - shift * interval * steps).round().long().clamp_min(0)
        alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(latents.device)
        signal, signal_earlier = alphas_cumprod[timesteps].sqrt(), alphas_cumprod[earlier].sqrt()
        ratio = ((1 - alphas_cumprod[earlier]) / (1 - alphas_cumprod[timesteps])).sqrt()  # of the noise's scales, <= 1
        shape = (-1, *[1] * (latents.dim() - 1))
        moved = signal_earlier.view(shape) * latents + ratio.view(shape) * (noisy - signal.view(shape) * latents)
        return moved.to(noisy.dtype), earlier


class RectifiedFlow(Objective):
    """Rectified flow (Liu et al. 2022; SD3, Esser et al. 2024): x_t = (1 - t) x0 + t noise on a straight line, the
    network predicts its velocity noise - x0, t from ``timestep_density`` (logit_normal(0, 1) by default: SD3's
    study ranked it first of 61 variants) and shown to the network as 1000 t. Sampled by diffusers'
    ``FlowMatchEulerDiscreteScheduler`` (or Heun) from t = 1 down. ``shift`` warps the sampling times
    (shift t / (1 + (shift - 1) t)); SD3 published 3.0 for its large images, 1 here: training from scratch, the
    times sampling walks are those training drew (the shift does not touch training's t)."""

    name = "rectified_flow"
    samplers = {"euler": FlowMatchEulerDiscreteScheduler, "heun": FlowMatchHeunDiscreteScheduler}
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

    def less_noisy(self, latents: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor, interval: float,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        t = timesteps / self.num_train_timesteps
        shift = torch.rand(len(t), generator=generator, device=generator.device).to(t.device)
        earlier = (t - shift * interval).clamp_min(0)
        ratio = torch.where(t > 0, earlier / t.clamp_min(1e-12), torch.zeros_like(t))  # x_t' - x0 = t'/t (x_t - x0)
        moved = latents + ratio.to(latents.dtype).view(-1, *[1] * (latents.dim() - 1)) * (noisy - latents)
        return moved.to(noisy.dtype), earlier * self.num_train_timesteps
