"""Sampling the reverse process with diffusers schedulers. A model trained with DDPM samples with DDPM (Ho et al.
2020, ancestral, up to the training steps) or DDIM (Song et al. 2021, ``eta`` = 0 deterministic, 1 DDPM-like), both
with the training schedule's betas; one trained with rectified flow with Euler or Heun steps along its velocity
(diffusers' FlowMatch schedulers; Heun takes 2N - 1 network evaluations for N steps). A class-conditional model
draws given classes, guided (ldm_lab/diffusion/guidance.py).
Pure: networks and schedulers in, latents and images out (loading a trained model from a checkpoint or
folder is ldm_lab/io/sources.py)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from torch import nn
from tqdm import tqdm

from ldm_lab.config.errors import ConfigError
from ldm_lab.diffusion.guidance import Predict, guided
from ldm_lab.nn.denoisers import side_multiple
from ldm_lab.nn.frozen_autoencoder import FrozenAutoencoder

# sample.sampler: the scheduler class of each, by the objective whose models it samples; auto is the first
SAMPLERS = {
    "ddpm": {"ddim": DDIMScheduler, "ddpm": DDPMScheduler},
    "rectified_flow": {"euler": FlowMatchEulerDiscreteScheduler, "heun": FlowMatchHeunDiscreteScheduler},
}


@dataclass
class LatentDiffusionModel:
    """What sampling a trained latent diffusion model needs, wherever it came from (a training stage, an
    exported pipeline folder, an original checkpoint): the evaluation denoiser (ldm_lab/nn/denoisers.py), the
    frozen first stage, the latent scale, the scheduler its objective samples with (DDPM: DDIM with the training
    betas and the sampling spacing; rectified flow: FlowMatch Euler), and a class-conditional model's class names
    (ids are positions; the null class is id K)."""

    denoiser: nn.Module
    first_stage: FrozenAutoencoder
    latent_scale: float
    scheduler: SchedulerMixin
    class_names: list[str] | None = None

    @property
    def null_class(self) -> int | None:
        return len(self.class_names) if self.class_names is not None else None

    def to(self, device: torch.device | str) -> LatentDiffusionModel:
        self.denoiser.to(device)
        self.first_stage.to(device)
        return self

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent times the denoiser's side multiple: image sides must divide by it."""
        return self.first_stage.downsample_factor * side_multiple(self.denoiser)

    def generate(self, num_images: int, height: int, width: int, **options) -> torch.Tensor:
        """:func:`generate_images` with this model's parts (``class_labels``: one id per image, for a
        class-conditional model, which it requires)."""
        if (options.get("class_labels") is None) != (self.class_names is None):
            raise ConfigError("a class-conditional model draws given classes (class_labels), an unconditional one none")
        return generate_images(self.denoiser, self.first_stage, self.latent_scale, self.scheduler, num_images, height,
                               width, null_class=self.null_class, **options)


def objective_of(scheduler: SchedulerMixin) -> str:
    """The objective a model holding ``scheduler`` was trained with: ddpm or rectified_flow."""
    flow = isinstance(scheduler, FlowMatchEulerDiscreteScheduler | FlowMatchHeunDiscreteScheduler)
    return "rectified_flow" if flow else "ddpm"


def inference_scheduler(scheduler: SchedulerMixin, sampler: str = "auto") -> SchedulerMixin:
    """A ``sampler`` scheduler built from the one a model holds (``auto``: its objective's first, ddim or euler):
    DDIM keeps its spacing (``steps_offset``, ``set_alpha_to_one``), DDPM walks every step down to 0; a sampler
    of the other objective is refused."""
    objective = objective_of(scheduler)
    samplers = SAMPLERS[objective]
    sampler = next(iter(samplers)) if sampler == "auto" else sampler
    if sampler not in samplers:
        known = sorted(name for names in SAMPLERS.values() for name in names)
        why = "is no sampler" if sampler not in known else "samples models of another objective"
        raise ConfigError(f"sample.sampler={sampler} {why}: this model was trained with model/objective={objective}, "
                          f"which samples with {' or '.join(samplers)} (or auto: {next(iter(samplers))})")
    if sampler == "ddpm":
        return DDPMScheduler.from_config(scheduler.config, steps_offset=0)
    return samplers[sampler].from_config(scheduler.config)


@torch.no_grad()
def denoise(predict: Predict, scheduler: SchedulerMixin, noise: torch.Tensor, num_inference_steps: int,
            eta: float = 0.0, generator: torch.Generator | None = None, progress: bool = True) -> torch.Tensor:
    """Latents from Gaussian ``noise`` after ``num_inference_steps`` reverse steps of ``predict`` (latents,
    timestep -> prediction; :func:`~ldm_lab.diffusion.guidance.guided`): the loop of diffusers' ``LDMPipeline``
    (same operations, same order), with ``generator`` also seeding the steps' noise. FlowMatch schedulers start
    from the noise itself and take the latents unscaled (they have no ``init_noise_sigma`` or ``scale_model_input``)."""
    scheduler.set_timesteps(num_inference_steps)
    latents = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    scale_input = getattr(scheduler, "scale_model_input", lambda sample, t: sample)
    extra = {"eta": eta} if "eta" in inspect.signature(scheduler.step).parameters else {}
    for t in tqdm(scheduler.timesteps, desc="denoising", unit="step", disable=not progress, leave=False,
                  dynamic_ncols=True):
        prediction = predict(scale_input(latents, t), t)
        latents = scheduler.step(prediction, t, latents, generator=generator, **extra).prev_sample
    return latents


@torch.no_grad()
def generate_images(denoiser: nn.Module, first_stage: nn.Module, latent_scale: float, scheduler: SchedulerMixin,
                    num_images: int, height: int, width: int, sampler: str = "auto", num_inference_steps: int = 50,
                    eta: float = 0.0, batch_size: int | None = None, generator: torch.Generator | None = None,
                    progress: bool = False, class_labels: torch.Tensor | None = None, guidance_scale: float = 1.0,
                    null_class: int | None = None) -> torch.Tensor:
    """``num_images`` images of ``height`` x ``width`` pixels in [-1, 1]: noise drawn on the CPU from
    ``generator`` batch after batch (as ``LDMPipeline`` draws it), denoised by ``denoiser`` with the ``sampler``
    built from ``scheduler`` (image i of class ``class_labels[i]``, guided by ``guidance_scale`` against
    ``null_class``, when given), divided by the latent scale and decoded by the first stage."""
    factor = first_stage.downsample_factor
    multiple = factor * side_multiple(denoiser)
    if height % multiple or width % multiple:
        raise ConfigError(f"{height}x{width} px: both sides must be multiples of {multiple} "
                          f"(first stage x denoiser's side multiple); e.g. sample.height={max(multiple, height // multiple * multiple)}")
    scheduler = inference_scheduler(scheduler, sampler)
    device = next(denoiser.parameters()).device
    batch_size = batch_size or num_images
    images = []
    for start in tqdm(range(0, num_images, batch_size), desc="sampling", unit="batch", disable=not progress,
                      dynamic_ncols=True):
        shape = (min(batch_size, num_images - start), denoiser.config.in_channels, height // factor, width // factor)
        noise = randn_tensor(shape, generator=generator).to(device)
        labels = None if class_labels is None else class_labels[start : start + len(noise)].to(device)
        predict = guided(denoiser, labels, guidance_scale, null_class)
        latents = denoise(predict, scheduler, noise, num_inference_steps, eta, generator, progress)
        images.append(first_stage.decode(latents / latent_scale).float().cpu())
    return torch.cat(images)
