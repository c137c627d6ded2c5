"""A class-conditional latent diffusion pipeline for diffusers alone: the ``pipeline.py`` that ldm_lab's export of a
class-conditional model carries (this file, copied). diffusers has none that samples a class-conditional
``UNet2DModel`` with guidance: ``LDMPipeline`` ignores labels and ``DiTPipeline`` hard-codes the null class 1000.

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True)
    images = pipe(class_labels=["00-ellipses-hue045", 3], guidance_scale=3.0, num_inference_steps=50).images

It imports nothing of ldm_lab; its sampling is ldm_lab's (ldm_lab/diffusion/sampling.py and guidance.py): the
same noise for the same generator, the same steps, the same guidance.
"""

from __future__ import annotations

import inspect

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

NULL_CLASS = "null_class"


class ClassConditionalLDMPipeline(DiffusionPipeline):
    """``vqvae``: the first stage (a ``VQModel`` or an ``AutoencoderKL``), whose ``scaling_factor`` is the latent
    scale; ``unet``: a ``UNet2DModel`` with ``num_class_embeds`` K + 1, id K the null class (the unconditional
    prediction); ``scheduler``: DDIM (or DDPM) with the training betas; ``class_names``: the K class names, by id.
    Classifier-free guidance (Ho & Salimans 2022): uncond + s (cond - uncond), in one doubled batch."""

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

    @torch.no_grad()
    def __call__(self, class_labels, guidance_scale: float = 1.0, num_inference_steps: int = 50, eta: float = 0.0,
                 generator: torch.Generator | None = None, height: int | None = None, width: int | None = None,
                 output_type: str = "pil", return_dict: bool = True):
        """One image per entry of ``class_labels``; ``guidance_scale`` 1 is the conditional model alone.
        ``height`` / ``width`` in pixels (default: the UNet's ``sample_size`` latents, square)."""
        factor = 2 ** (len(self.vqvae.config.block_out_channels) - 1)
        latent_height = height // factor if height else self.unet.config.sample_size
        latent_width = width // factor if width else self.unet.config.sample_size
        labels = torch.tensor(self.class_ids(class_labels), device=self.device)
        shape = (len(labels), self.unet.config.in_channels, latent_height, latent_width)
        latents = randn_tensor(shape, generator=generator).to(self.device)  # drawn on the CPU, as LDMPipeline
        null = torch.full_like(labels, self.unet.config.num_class_embeds - 1)
        both = torch.cat([labels, null])
        self.scheduler.set_timesteps(num_inference_steps)
        latents = latents * self.scheduler.init_noise_sigma
        extra = {"eta": eta} if "eta" in inspect.signature(self.scheduler.step).parameters else {}
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = self.scheduler.scale_model_input(latents, t)
            if guidance_scale == 1:
                prediction = self.unet(model_input, t, class_labels=labels).sample
            else:
                conditional, unconditional = self.unet(torch.cat([model_input, model_input]), t,
                                                       class_labels=both).sample.chunk(2)
                prediction = unconditional + guidance_scale * (conditional - unconditional)
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
