"""Pictures of progress: every N steps a grid of the stage's trained model (an autoencoder: the same
validation images over their reconstructions; a latent diffusion pipeline: samples from the same noise)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import lightning as L
import torch
from torchvision.utils import make_grid, save_image

from ldm_lab.callbacks.loggers import log_image
from ldm_lab.diffusion.pipeline import LatentDiffusionPipeline
from ldm_lab.diffusion.sampling import SamplingOptions
from ldm_lab.io.samples import captioned_grid, preview_samples
from ldm_lab.nn.frozen_autoencoder import reconstruct

PREVIEW_PROMPTS = 4  # a text-conditional model's preview: a row for each of this many validation captions


class ImageLogger(L.Callback):
    """Every ``every_n_steps`` optimizer steps (and before the first) the grid of :func:`preview` of
    ``pl_module.trained_model()``: to every logger that takes images (``val/<name>``) and as
    ``<dirpath>/<name>_step<step>.png``. ``sampling``: the run's ``sample.*``, so a diffusion model's grid is drawn
    as task=sample would draw it."""

    def __init__(self, every_n_steps: int, num_images: int = 8, dirpath: str | Path = "images",
                 sampling: Mapping | None = None):
        self.every_n_steps = every_n_steps
        self.num_images = num_images
        self.dirpath = Path(dirpath)
        self.sampling = SamplingOptions.from_config(sampling or {})
        self._logged_step: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.step % self.every_n_steps == 0:
            self._log(trainer, pl_module)

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = pl_module.step
        if step == self._logged_step or not trainer.is_global_zero:
            return
        self._logged_step = step
        was_training = pl_module.training
        pl_module.eval()
        with trainer.precision_plugin.forward_context():
            name, images, nrow, captions = preview(pl_module.trained_model(), trainer.datamodule, self.num_images,
                                                   self.sampling, pl_module.seed)
        pl_module.train(was_training)
        # TensorBoard takes no bf16 images: float, clamp, then [0, 1].
        images = images.float().cpu().clamp(-1, 1).add(1).div(2)
        grid = (captioned_grid(images, nrow, captions) if captions else
                make_grid(images, nrow=nrow, padding=2, pad_value=1.0))
        self.dirpath.mkdir(parents=True, exist_ok=True)
        save_image(grid, self.dirpath / f"{name}_step{step:07d}.png")
        for logger in trainer.loggers:
            log_image(logger, f"val/{name}", grid, step)


@torch.no_grad()
def preview(model: torch.nn.Module | LatentDiffusionPipeline, datamodule, num_images: int, sampling: SamplingOptions,
            seed: int) -> tuple[str, torch.Tensor, int, list[str] | None]:
    """(name, images in [-1, 1], images per row, each row's caption or None). A pipeline: ``num_images`` samples at
    the data's leftover resolution from noise of ``seed`` (:func:`~ldm_lab.io.samples.preview_samples`; a
    text-conditional model's a row for each of the first validation images' captions, written under it); an
    autoencoder: the datamodule's ``num_images`` preview images over their deterministic reconstructions."""
    if isinstance(model, LatentDiffusionPipeline):
        prompts = datamodule.preview_captions(PREVIEW_PROMPTS) if model.text_encoder is not None else None
        images, per_row = preview_samples(model, sampling, num_images, datamodule.leftover_resolution, seed, prompts)
        return "samples", images, per_row, prompts
    inputs = datamodule.preview_images(num_images).to(model.device)
    return "recon", torch.cat([inputs, reconstruct(model, inputs)]), len(inputs), None
