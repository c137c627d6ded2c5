"""The latent diffusion sampler: ldm_lab's exports carry this file as ``pipeline.py``, and the lab samples through it
(training previews, task=sample, task=evaluate), so what the lab measures is what it ships. It imports nothing of
ldm_lab; the lab imports the denoiser call (:func:`predict`), guidance (:func:`guided`) and the denoising loop
(:func:`denoise`) from here.

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    images = pipe(class_labels=["00-ellipses-hue045", 3], guidance_scale=3.0, num_inference_steps=50).images
    images = pipe(prompt=["two red circles"], guidance_scale=5.0, negative_prompt="").images  # a text model
    images = pipe(batch_size=4, num_inference_steps=50).images  # an unconditional model

Any denoiser (``UNet2DModel``, ``UNet2DConditionModel``, ``DiTTransformer2DModel``, ``PixArtTransformer2DModel``),
any scheduler of its objective (DDIM or DDPM for a model trained with DDPM, FlowMatch Euler or Heun for rectified
flow: swap ``pipe.scheduler`` as diffusers does), unconditional, with classes or with prompts (a ``tokenizer`` and
``text_encoder`` encode them as Stable Diffusion's ``encode_prompt`` does, or, for T5, as ``PixArtAlphaPipeline``
does). ``LDMPipeline`` samples none of the others: it ignores labels, calls ``init_noise_sigma``, which FlowMatch
schedulers lack, and ``DiTPipeline`` hard-codes the null class 1000.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from diffusers import (
    DiffusionPipeline,
    DiTTransformer2DModel,
    ImagePipelineOutput,
    PixArtTransformer2DModel,
    UNet2DConditionModel,
)
from diffusers.utils.torch_utils import randn_tensor

NULL_CLASS = "null_class"  # a class-conditional model's null class (id K): its unconditional prediction

Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (latents, timestep) -> the network's prediction


def predict(network: torch.nn.Module, latents: torch.Tensor, timesteps, class_labels: torch.Tensor | None = None,
            encoder_hidden_states: torch.Tensor | None = None, encoder_attention_mask: torch.Tensor | None = None
            ) -> torch.Tensor:
    """The denoiser's prediction for ``latents`` at ``timesteps`` (a number or one per image) of ``class_labels``
    or of prompts' ``encoder_hidden_states`` (with ``encoder_attention_mask`` where the text encoder masks its
    padding): a ``UNet2DModel`` adds the class embedding to its time embedding (diffusers' ``num_class_embeds``); a
    ``UNet2DConditionModel`` and a ``PixArtTransformer2DModel`` attend to the prompt's embeddings (PixArt as
    ``PixArtAlphaPipeline`` calls it); a ``DiTTransformer2DModel`` always gets a class (an unconditional one:
    class 0) and square latents (its unpatchify is square)."""
    timesteps = torch.as_tensor(timesteps, device=latents.device).expand(len(latents))
    if isinstance(network, UNet2DConditionModel):
        return network(latents, timesteps, encoder_hidden_states=encoder_hidden_states,
                       encoder_attention_mask=encoder_attention_mask).sample
    if isinstance(network, PixArtTransformer2DModel):
        return network(latents, encoder_hidden_states=encoder_hidden_states,
                       encoder_attention_mask=encoder_attention_mask, timestep=timesteps,
                       added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    if isinstance(network, DiTTransformer2DModel):
        if latents.shape[-2] != latents.shape[-1]:
            raise ValueError(f"a DiTTransformer2DModel denoises square latents only (its unpatchify is square), not "
                             f"{latents.shape[-2]}x{latents.shape[-1]}: give height equal to width")
        if class_labels is None:
            class_labels = torch.zeros(len(latents), dtype=torch.long, device=latents.device)
        return network(latents, timestep=timesteps, class_labels=class_labels).sample
    return network(latents, timesteps, class_labels=class_labels).sample


def guided(network: torch.nn.Module, condition: Mapping[str, torch.Tensor] | None = None,
           null_condition: Mapping[str, torch.Tensor] | None = None, guidance_scale: float = 1.0) -> Predict:
    """Classifier-free guidance (Ho & Salimans 2022) as a wrapper of the denoiser: its prediction given
    ``condition`` (keywords of :func:`predict`: ``class_labels`` or ``encoder_hidden_states``, one per image;
    None: an unconditional model); with a ``guidance_scale`` other than 1 also given ``null_condition`` (the null
    class, the empty or negative prompt), in one doubled batch (conditional first), combined as
    uncond + s (cond - uncond) on every latent channel (DiT's code guided 3 of 4, its issue 41)."""
    condition = dict(condition or {})
    if not condition or guidance_scale == 1:
        return lambda latents, t: predict(network, latents, t, **condition)
    if null_condition is None:
        raise ValueError("guidance needs the model's null condition (its null class or empty prompt)")
    both = {key: torch.cat([value, null_condition[key]]) for key, value in condition.items()}

    def guided_predict(latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        conditional, unconditional = predict(network, torch.cat([latents, latents]), t, **both).chunk(2)
        return unconditional + guidance_scale * (conditional - unconditional)

    return guided_predict


def masks_padding(text_encoder: torch.nn.Module) -> bool:
    """Whether prompts are read with their padding masked, in the text encoder and the denoiser's cross-attention:
    a T5 encoder's, as ``PixArtAlphaPipeline`` reads them (CLIP's, as Stable Diffusion reads them, are not)."""
    return text_encoder.config.model_type == "t5"


def encode_prompt(tokenizer, text_encoder: torch.nn.Module, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """The prompts' condition for :func:`predict`: ``encoder_hidden_states`` (N, tokens, width), the text model's
    last hidden state over tokens padded (and truncated) to the tokenizer's ``model_max_length``. A CLIP encoder's
    as Stable Diffusion's ``encode_prompt`` makes them (no attention mask unless its config asks for one,
    ``use_attention_mask``); a T5 encoder's as ``PixArtAlphaPipeline``'s with ``clean_caption=False`` (the text
    lower-cased and stripped; the padding masked: ``encoder_attention_mask`` (N, tokens) too). Training encodes
    captions with this."""
    masked = masks_padding(text_encoder)
    if masked:
        prompts = [prompt.lower().strip() for prompt in prompts]
    tokens = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")
    device = next(text_encoder.parameters()).device
    mask = tokens.attention_mask.to(device)
    use_mask = masked or getattr(text_encoder.config, "use_attention_mask", False)
    hidden_states = text_encoder(tokens.input_ids.to(device), attention_mask=mask if use_mask else None)[0]
    return {"encoder_hidden_states": hidden_states, **({"encoder_attention_mask": mask} if masked else {})}


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
    scale; ``unet``: the denoiser (LDMPipeline's name for it), a ``UNet2DModel``, ``UNet2DConditionModel``,
    ``DiTTransformer2DModel`` or ``PixArtTransformer2DModel``; ``scheduler``: what it samples with;
    ``class_names``: a class-conditional model's K class names by id (id K is the null class), empty otherwise;
    ``objective``: what the denoiser learned (``ddpm`` or ``rectified_flow``), which tells the schedulers it samples
    with; ``tokenizer`` and ``text_encoder``: a text-conditional model's (transformers')."""

    model_cpu_offload_seq = "text_encoder->unet->vqvae"
    _optional_components = ["tokenizer", "text_encoder"]

    def __init__(self, vqvae, unet, scheduler, class_names: list[str] | None = None, objective: str | None = None,
                 tokenizer=None, text_encoder=None):
        super().__init__()
        self.register_modules(vqvae=vqvae, unet=unet, scheduler=scheduler, tokenizer=tokenizer,
                              text_encoder=text_encoder)
        self.register_to_config(class_names=list(class_names or []), objective=objective)

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent of the first stage."""
        return 2 ** (len(self.vqvae.config.block_out_channels) - 1)

    def conditions(self, class_labels=None, prompt=None, negative_prompt=None, batch_size: int = 1
                   ) -> tuple[int, dict | None, dict | None]:
        """(images, condition, null condition) for :func:`guided`: a class-conditional model's ``class_labels``
        (:func:`class_ids`) and its null class; a text-conditional model's ``prompt`` (a string or one per image)
        and ``negative_prompt`` (default: the empty prompt, trained as the unconditional one); an unconditional
        model's ``batch_size``, with no condition."""
        class_names = list(self.config.class_names)
        text = self.text_encoder is not None
        given = "class_labels" if class_labels is not None else "prompt" if prompt is not None else None
        needed = "class_labels" if class_names else "prompt" if text else None
        if given != needed:
            kind = "class-conditional" if class_names else "text-conditional" if text else "unconditional"
            asks = {"class_labels": "given classes (class_labels=[...])", "prompt": "given prompts (prompt=[...])",
                    None: "batch_size=N images"}
            raise ValueError(f"this {kind} model draws {asks[needed]}, not {asks[given]}")
        if class_names:
            labels = torch.tensor(class_ids(class_labels, class_names), device=self.device)
            return len(labels), {"class_labels": labels}, {"class_labels": torch.full_like(labels, len(class_names))}
        if text:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            negative = "" if negative_prompt is None else negative_prompt
            negatives = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
            both = encode_prompt(self.tokenizer, self.text_encoder, prompts + negatives)
            both["encoder_hidden_states"] = both["encoder_hidden_states"].to(self.unet.dtype)
            return (len(prompts), {key: value[: len(prompts)] for key, value in both.items()},
                    {key: value[len(prompts) :] for key, value in both.items()})
        return batch_size, None, None

    @torch.no_grad()
    def __call__(self, class_labels=None, batch_size: int = 1, guidance_scale: float = 1.0,
                 num_inference_steps: int = 50, eta: float = 0.0, generator: torch.Generator | None = None,
                 height: int | None = None, width: int | None = None, output_type: str = "pil",
                 return_dict: bool = True, prompt=None, negative_prompt=None):
        """One image per entry of ``class_labels`` (:func:`class_ids`; a class-conditional model) or of ``prompt``
        (a text-conditional one, guided away from ``negative_prompt``), or ``batch_size`` images (an unconditional
        one); ``guidance_scale`` 1 is the conditional model alone. ``height`` / ``width`` in pixels (default: the
        denoiser's ``sample_size`` latents, square). The noise is drawn on the CPU from ``generator``, as
        ``LDMPipeline`` draws it. ``output_type``: pil, np or pt (in [0, 1])."""
        count, condition, null_condition = self.conditions(class_labels, prompt, negative_prompt, batch_size)
        latent_height = height // self.downsample_factor if height else self.unet.config.sample_size
        latent_width = width // self.downsample_factor if width else self.unet.config.sample_size
        shape = (count, self.unet.config.in_channels, latent_height, latent_width)
        noise = randn_tensor(shape, generator=generator).to(self.device)
        predict_step = guided(self.unet, condition, null_condition, guidance_scale)
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
