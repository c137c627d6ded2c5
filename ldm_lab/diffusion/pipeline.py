"""The latent diffusion sampler: ldm_lab's exports carry this file as ``pipeline.py``, and the lab samples through it
(training previews, task=sample, task=evaluate), so what the lab measures is what it ships. It imports nothing of
ldm_lab; the lab imports the denoiser call (:func:`predict`), guidance (:func:`guided`) and the denoising loop
(:func:`denoise`) from here.

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    images = pipe(class_labels=["00-ellipses-hue045", 3], guidance_scale=3.0, num_inference_steps=50).images
    images = pipe(batch_size=4, num_inference_steps=50).images  # an unconditional model

Any denoiser (``UNet2DModel``, ``DiTTransformer2DModel``), any scheduler of its objective (DDIM or DDPM for a model
trained with DDPM, FlowMatch Euler or Heun for rectified flow: swap ``pipe.scheduler`` as diffusers does), with or
without classes. ``LDMPipeline`` samples none of the others: it ignores labels, calls ``init_noise_sigma``, which
FlowMatch schedulers lack, and ``DiTPipeline`` hard-codes the null class 1000.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence

import torch
from diffusers import DiffusionPipeline, DiTTransformer2DModel, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

NULL_CLASS = "null_class"  # a class-conditional model's null class (id K): its unconditional prediction

Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (latents, timestep) -> the network's prediction


def predict(network: torch.nn.Module, latents: torch.Tensor, timesteps, class_labels: torch.Tensor | None = None
            ) -> torch.Tensor:
    """The denoiser's prediction for ``latents`` at ``timesteps`` (a number or one per image) of ``class_labels``:
    a ``UNet2DModel`` adds the class embedding to its time embedding (diffusers' ``num_class_embeds``); a
    ``DiTTransformer2DModel`` always gets a class (an unconditional one: class 0) and square latents (its
    unpatchify is square)."""
    timesteps = torch.as_tensor(timesteps, device=latents.device).expand(len(latents))
    if isinstance(network, DiTTransformer2DModel):
        if latents.shape[-2] != latents.shape[-1]:
            raise ValueError(f"a DiTTransformer2DModel denoises square latents only (its unpatchify is square), not "
                             f"{latents.shape[-2]}x{latents.shape[-1]}: give height equal to width")
        if class_labels is None:
            class_labels = torch.zeros(len(latents), dtype=torch.long, device=latents.device)
        return network(latents, timestep=timesteps, class_labels=class_labels).sample
    return network(latents, timesteps, class_labels=class_labels).sample


def guided(network: torch.nn.Module, class_labels: torch.Tensor | None = None, guidance_scale: float = 1.0,
           null_class: int | None = None) -> Predict:
    """Classifier-free guidance (Ho & Salimans 2022) as a wrapper of the denoiser: its unconditional prediction;
    with ``class_labels`` (N,) its conditional one; with a ``guidance_scale`` other than 1 both, in one doubled
    batch (conditional first, then ``null_class``), combined as uncond + s (cond - uncond) on every latent channel
    (DiT's code guided 3 of 4, its issue 41)."""
    if class_labels is None or guidance_scale == 1:
        return lambda latents, t: predict(network, latents, t, class_labels)
    if null_class is None:
        raise ValueError("guidance needs the model's null class: a model trained with classes")
    both = torch.cat([class_labels, torch.full_like(class_labels, null_class)])

    def guided_predict(latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        conditional, unconditional = predict(network, torch.cat([latents, latents]), t, both).chunk(2)
        return unconditional + guidance_scale * (conditional - unconditional)

    return guided_predict


@torch.no_grad()
def denoise(predict: Predict, scheduler, noise: torch.Tensor, num_inference_steps: int, eta: float = 0.0,
            generator: torch.Generator | None = None, progress_bar: Callable[[Iterable], Iterable] = iter
            ) -> torch.Tensor:
    """Latents from Gaussian ``noise`` after ``num_inference_steps`` reverse steps of ``predict``: the loop of
    diffusers' ``LDMPipeline`` (same operations, same order), with ``generator`` also seeding the steps' noise
    (DDPM, DDIM with ``eta`` > 0). FlowMatch schedulers start from the noise itself and take the latents unscaled
    (they have no ``init_noise_sigma`` or ``scale_model_input``); Heun takes 2N - 1 evaluations for N steps."""
    scheduler.set_timesteps(num_inference_steps)
    latents = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    scale_input = getattr(scheduler, "scale_model_input", lambda sample, t: sample)
    extra = {"eta": eta} if "eta" in inspect.signature(scheduler.step).parameters else {}
    for t in progress_bar(scheduler.timesteps):
        prediction = predict(scale_input(latents, t), t)
        latents = scheduler.step(prediction, t, latents, generator=generator, **extra).prev_sample
    return latents


def class_ids(class_labels: str | int | Sequence[str | int], class_names: Sequence[str]) -> list[int]:
    """Class names, ids 0 to K - 1 or ``null_class`` (id K), one per image, as ids."""
    names = [str(name) for name in class_names]
    ids = []
    for label in [class_labels] if isinstance(class_labels, str | int) else class_labels:
        if label == NULL_CLASS:
            ids.append(len(names))
        elif isinstance(label, int) and 0 <= label <= len(names):
            ids.append(label)
        elif str(label) in names:
            ids.append(names.index(str(label)))
        else:
            shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
            raise ValueError(f"{label!r} is no class of this model: give names ({shown}), ids 0-{len(names) - 1} "
                             f"or {NULL_CLASS!r} (unconditional samples)")
    return ids


class LatentDiffusionPipeline(DiffusionPipeline):
    """``vqvae``: the first stage (a ``VQModel`` or an ``AutoencoderKL``), whose ``scaling_factor`` is the latent
    scale; ``unet``: the denoiser (LDMPipeline's name for it), a ``UNet2DModel`` or a ``DiTTransformer2DModel``;
    ``scheduler``: what it samples with; ``class_names``: a class-conditional model's K class names by id (id K is
    the null class), empty for an unconditional one; ``objective``: what the denoiser learned (``ddpm`` or
    ``rectified_flow``), which tells the schedulers it samples with."""

    model_cpu_offload_seq = "unet->vqvae"

    def __init__(self, vqvae, unet, scheduler, class_names: list[str] | None = None, objective: str | None = None):
        super().__init__()
        self.register_modules(vqvae=vqvae, unet=unet, scheduler=scheduler)
        self.register_to_config(class_names=list(class_names or []), objective=objective)

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent of the first stage."""
        return 2 ** (len(self.vqvae.config.block_out_channels) - 1)

    @torch.no_grad()
    def __call__(self, class_labels=None, batch_size: int = 1, guidance_scale: float = 1.0,
                 num_inference_steps: int = 50, eta: float = 0.0, generator: torch.Generator | None = None,
                 height: int | None = None, width: int | None = None, output_type: str = "pil",
                 return_dict: bool = True):
        """One image per entry of ``class_labels`` (:func:`class_ids`; a class-conditional model), or ``batch_size``
        images (an unconditional one); ``guidance_scale`` 1 is the conditional model alone. ``height`` / ``width``
        in pixels (default: the denoiser's ``sample_size`` latents, square). The noise is drawn on the CPU from
        ``generator``, as ``LDMPipeline`` draws it. ``output_type``: pil, np or pt (in [0, 1])."""
        class_names = list(self.config.class_names)
        if bool(class_names) != (class_labels is not None):
            raise ValueError("a class-conditional model draws given classes (class_labels=[...]), an unconditional "
                             "one none (batch_size=N)")
        latent_height = height // self.downsample_factor if height else self.unet.config.sample_size
        latent_width = width // self.downsample_factor if width else self.unet.config.sample_size
        labels = torch.tensor(class_ids(class_labels, class_names), device=self.device) if class_names else None
        shape = (len(labels) if class_names else batch_size, self.unet.config.in_channels, latent_height, latent_width)
        noise = randn_tensor(shape, generator=generator).to(self.device)
        predict_step = guided(self.unet, labels, guidance_scale, len(class_names))
        latents = denoise(predict_step, self.scheduler, noise, num_inference_steps, eta, generator, self.progress_bar)
        images = self.vqvae.decode(latents / self.vqvae.config.scaling_factor).sample
        images = (images.float() / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            images = images.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
