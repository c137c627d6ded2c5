"""A latent diffusion pipeline for diffusers alone: the ``pipeline.py`` that ldm_lab's exports carry (this file,
copied) for every model ``LDMPipeline`` cannot sample: class-conditional ones (``LDMPipeline`` ignores labels,
``DiTPipeline`` hard-codes the null class 1000), rectified-flow ones (FlowMatch schedulers have no
``init_noise_sigma``, which ``LDMPipeline`` calls) and DiT ones.

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True)
    images = pipe(class_labels=["00-ellipses-hue045", 3], guidance_scale=3.0, num_inference_steps=50).images
    images = pipe(batch_size=4, num_inference_steps=50).images  # an unconditional model

It imports nothing of ldm_lab; its sampling is ldm_lab's (ldm_lab/diffusion/sampling.py, guidance.py and
ldm_lab/nn/denoisers.py): the same noise for the same generator, the same steps, the same guidance.
"""

from __future__ import annotations

import inspect

import torch
from diffusers import DiffusionPipeline, DiTTransformer2DModel, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

NULL_CLASS = "null_class"


class LatentDiffusionPipeline(DiffusionPipeline):
    """``vqvae``: the first stage (a ``VQModel`` or an ``AutoencoderKL``), whose ``scaling_factor`` is the latent
    scale; ``unet``: the denoiser (LDMPipeline's name for it), a ``UNet2DModel`` or a ``DiTTransformer2DModel``;
    ``scheduler``: what the model's objective samples with (DDIM with the training betas, or FlowMatch Euler);
    ``class_names``: a class-conditional model's K class names by id (id K is the null class, the unconditional
    prediction), empty for an unconditional one. Classifier-free guidance (Ho & Salimans 2022):
    uncond + s (cond - uncond), in one doubled batch."""

    model_cpu_offload_seq = "unet->vqvae"

    def __init__(self, vqvae, unet, scheduler, class_names: list[str] | None = None):
        super().__init__()
        self.register_modules(vqvae=vqvae, unet=unet, scheduler=scheduler)
        self.register_to_config(class_names=list(class_names or []))

    def class_ids(self, class_labels) -> list[int]:
        """Names, ids or ``null_class``, one per image."""
        names = list(self.config.class_names)
        ids = []
        for label in [class_labels] if isinstance(class_labels, str | int) else class_labels:
            if label == NULL_CLASS:
                ids.append(len(names))
            elif isinstance(label, int) and 0 <= label < len(names):
                ids.append(label)
            elif label in names:
                ids.append(names.index(label))
            else:
                raise ValueError(f"{label!r} is no class of this model: give one of {names}, an id 0-{len(names) - 1} "
                                 f"or {NULL_CLASS!r}")
        return ids

    def predict(self, latents: torch.Tensor, t, class_labels: torch.Tensor | None) -> torch.Tensor:
        """The denoiser's prediction at timestep ``t`` (a DiT always gets a class: an unconditional one, class 0)."""
        timesteps = torch.as_tensor(t, device=latents.device).expand(len(latents))
        if isinstance(self.unet, DiTTransformer2DModel):
            if class_labels is None:
                class_labels = torch.zeros(len(latents), dtype=torch.long, device=latents.device)
            return self.unet(latents, timestep=timesteps, class_labels=class_labels).sample
        return self.unet(latents, timesteps, class_labels=class_labels).sample

    @torch.no_grad()
    def __call__(self, class_labels=None, batch_size: int = 1, guidance_scale: float = 1.0,
                 num_inference_steps: int = 50, eta: float = 0.0, generator: torch.Generator | None = None,
                 height: int | None = None, width: int | None = None, output_type: str = "pil",
                 return_dict: bool = True):
        """One image per entry of ``class_labels`` (a class-conditional model), or ``batch_size`` images (an
        unconditional one); ``guidance_scale`` 1 is the conditional model alone. ``height`` / ``width`` in pixels
        (default: the denoiser's ``sample_size`` latents, square)."""
        conditional = bool(self.config.class_names)
        if conditional != (class_labels is not None):
            raise ValueError("a class-conditional model draws given classes (class_labels=[...]), an unconditional "
                             "one none (batch_size=N)")
        factor = 2 ** (len(self.vqvae.config.block_out_channels) - 1)
        latent_height = height // factor if height else self.unet.config.sample_size
        latent_width = width // factor if width else self.unet.config.sample_size
        labels = torch.tensor(self.class_ids(class_labels), device=self.device) if conditional else None
        shape = (len(labels) if conditional else batch_size, self.unet.config.in_channels, latent_height, latent_width)
        latents = randn_tensor(shape, generator=generator).to(self.device)  # drawn on the CPU, as LDMPipeline
        guided = conditional and guidance_scale != 1
        both = torch.cat([labels, torch.full_like(labels, len(self.config.class_names))]) if guided else None
        self.scheduler.set_timesteps(num_inference_steps)
        latents = latents * getattr(self.scheduler, "init_noise_sigma", 1.0)  # FlowMatch: none, the noise itself
        scale_input = getattr(self.scheduler, "scale_model_input", lambda sample, t: sample)
        extra = {"eta": eta} if "eta" in inspect.signature(self.scheduler.step).parameters else {}
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = scale_input(latents, t)
            if guided:
                conditional_prediction, unconditional = self.predict(torch.cat([model_input, model_input]), t,
                                                                     both).chunk(2)
                prediction = unconditional + guidance_scale * (conditional_prediction - unconditional)
            else:
                prediction = self.predict(model_input, t, labels)
            latents = self.scheduler.step(prediction, t, latents, generator=generator, **extra).prev_sample
        images = self.vqvae.decode(latents / self.vqvae.config.scaling_factor).sample
        images = (images.float() / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            images = images.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
