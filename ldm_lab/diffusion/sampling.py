"""Drawing images as ``sample.*`` says (conf/sampling/), through the pipeline exports carry
(ldm_lab/diffusion/pipeline.py): training previews, task=sample and task=evaluate all call it, batch after batch,
with the scheduler ``sample.sampler`` names. Pure: a pipeline in, images out (loading one from a checkpoint or a
folder is ldm_lab/io/model_sources.py)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from tqdm import tqdm

from ldm_lab.core.errors import ConfigError
from ldm_lab.diffusion.objectives import Objective
from ldm_lab.diffusion.pipeline import LatentDiffusionPipeline, class_ids
from ldm_lab.nn.denoisers import backbone, side_multiple


@dataclass(frozen=True)
class SamplingOptions:
    """``sample.*``, typed: the sampler (``auto``: the objective's first), its steps and DDIM's ``eta``; how many
    images (per class or prompt, for a conditional model) in batches of how many; guidance and the classes drawn
    (None: every class; ``null_class``: unconditional samples); a text-conditional model's prompts (``prompts``, or
    ``prompt_file``: one per line) and ``negative_prompt`` (None: the empty prompt); the pixel size (None: the
    caller's default) and the seed."""

    sampler: str = "auto"
    num_inference_steps: int = 50
    eta: float = 0.0
    num_images: int = 16
    batch_size: int = 8
    guidance_scale: float = 3.0
    class_labels: str | int | tuple[str | int, ...] | None = None
    prompts: tuple[str, ...] | None = None
    prompt_file: str | None = None
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None
    seed: int = 0

    @classmethod
    def from_config(cls, sample: Mapping) -> SamplingOptions:
        """From the config's ``sample`` node (its other keys, such as ``sample.model``, are the tasks')."""
        options = {f.name: sample[f.name] for f in fields(cls) if f.name in sample}
        labels = options.get("class_labels")
        if labels is not None and not isinstance(labels, str | int):
            options["class_labels"] = tuple(labels)
        prompts = options.get("prompts")
        if prompts is not None:
            options["prompts"] = (prompts,) if isinstance(prompts, str) else tuple(str(p) for p in prompts)
        return cls(**options)

    def size(self, default: tuple[int, int]) -> tuple[int, int]:
        """(height, width) in pixels: ``sample.height`` / ``sample.width``, else ``default``'s."""
        return self.height or default[0], self.width or default[1]


def assemble(vae: torch.nn.Module, denoiser: torch.nn.Module, latent_scale: float, objective: Objective,
             class_names: Sequence[str] | None, tokenizer=None, text_encoder: torch.nn.Module | None = None
             ) -> LatentDiffusionPipeline:
    """The pipeline of a latent diffusion model's parts: the first stage with its ``scaling_factor`` set to the
    latent scale, the denoiser, the scheduler of the objective's default sampler, the classes, the objective, and
    a text-conditional model's tokenizer and text encoder."""
    vae.register_to_config(scaling_factor=float(latent_scale))
    return LatentDiffusionPipeline(vae, denoiser, objective.sampling_scheduler, class_names, objective.name,
                                   tokenizer, text_encoder)


def requested_classes(options: SamplingOptions, class_names: Sequence[str]) -> list[int]:
    """``sample.class_labels`` as ids (None: every class)."""
    if options.class_labels is None:
        return list(range(len(class_names)))
    try:
        return class_ids(options.class_labels, class_names)
    except ValueError as error:
        raise ConfigError(f"sample.class_labels: {error}, or null (every class)") from None


def requested_prompts(options: SamplingOptions) -> list[str]:
    """``sample.prompts``, or the non-empty lines of ``sample.prompt_file``."""
    if options.prompts is not None and options.prompt_file is not None:
        raise ConfigError("sample.prompts and sample.prompt_file both set: give the prompts one way")
    if options.prompt_file is not None:
        path = Path(options.prompt_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"sample.prompt_file={path} is no file: a text file with one prompt per line")
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise ConfigError(f"sample.prompt_file={path} holds no prompt: one per line")
        return prompts
    if not options.prompts:
        raise ConfigError("a text-conditional model draws given prompts: sample.prompts='[\"a prompt\", ...]' or "
                          "sample.prompt_file=<a file with one prompt per line>")
    return list(options.prompts)


def with_sampler(pipeline: LatentDiffusionPipeline, sampler: str) -> LatentDiffusionPipeline:
    """The pipeline's parts with the scheduler ``sampler`` names, built from the one it holds (its objective's)."""
    objective = Objective.named(pipeline.config.objective, pipeline.scheduler)
    return LatentDiffusionPipeline(pipeline.vqvae, pipeline.unet, objective.sampler_scheduler(pipeline.scheduler.config,
                                   sampler), pipeline.config.class_names, objective.name, pipeline.tokenizer,
                                   pipeline.text_encoder)


def check_size(pipeline: LatentDiffusionPipeline, height: int, width: int) -> None:
    """Image sides the pipeline can draw: multiples of the first stage's factor times the denoiser's side multiple,
    and square for a denoiser of square latents only."""
    multiple = pipeline.downsample_factor * side_multiple(pipeline.unet)
    if height % multiple or width % multiple:
        raise ConfigError(f"{height}x{width} px: both sides must be multiples of {multiple} (first stage x denoiser's "
                          f"side multiple); e.g. sample.height={max(multiple, height // multiple * multiple)}")
    if height != width and backbone(pipeline.unet).square_only:
        raise ConfigError(f"{type(pipeline.unet).__name__} denoises square latents only (diffusers' unpatchify is "
                          f"square), not {height}x{width} px: sample with sample.height equal to sample.width")


def generate(pipeline: LatentDiffusionPipeline, options: SamplingOptions, num_images: int, height: int, width: int,
             generator: torch.Generator, class_labels: Sequence[int] | None = None, guidance_scale: float = 1.0,
             batch_size: int | None = None, progress: bool = False, prompts: Sequence[str] | None = None
             ) -> torch.Tensor:
    """``num_images`` images of ``height`` x ``width`` pixels in [-1, 1] on the CPU (image i of class
    ``class_labels[i]`` or of ``prompts[i]``, guided by ``guidance_scale`` away from the null class or from
    ``options.negative_prompt``, for a conditional pipeline), drawn by ``pipeline`` with ``options``' sampler, steps
    and eta, ``batch_size`` (default ``options.batch_size``) at a time, all from one ``generator``."""
    check_size(pipeline, height, width)
    pipeline = with_sampler(pipeline, options.sampler)
    pipeline.set_progress_bar_config(desc="denoising", unit="step", leave=False, dynamic_ncols=True,
                                     disable=not progress)
    batch_size = batch_size or options.batch_size
    images = []
    for start in tqdm(range(0, num_images, batch_size), desc="sampling", unit="batch", disable=not progress,
                      dynamic_ncols=True):
        count = min(batch_size, num_images - start)
        labels = None if class_labels is None else list(class_labels[start : start + count])
        texts = None if prompts is None else list(prompts[start : start + count])
        drawn = pipeline(class_labels=labels, prompt=texts, negative_prompt=options.negative_prompt, batch_size=count,
                         guidance_scale=guidance_scale, num_inference_steps=options.num_inference_steps,
                         eta=options.eta, generator=generator, height=height, width=width, output_type="pt").images
        images.append(drawn.cpu() * 2 - 1)
    return torch.cat(images)

