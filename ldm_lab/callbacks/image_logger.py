"""Pictures of progress: the same validation images and their reconstructions every N steps."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torchvision.utils import make_grid, save_image


class ReconstructionLogger(L.Callback):
    """Every ``every_n_steps`` generator steps (and before the first), a grid with the first
    ``num_images`` validation images on top and their reconstructions below: to TensorBoard
    (``val/reconstructions``) and as ``<dirpath>/recon_step<step>.png``."""

    def __init__(self, every_n_steps: int, num_images: int = 8, dirpath: str | Path = "images"):
        self.every_n_steps = every_n_steps
        self.num_images = num_images
        self.dirpath = Path(dirpath)
        self._logged_step: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.gen_step % self.every_n_steps == 0:
            self._log(trainer, pl_module)

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = pl_module.gen_step
        if step == self._logged_step or not trainer.is_global_zero:
            return
        self._logged_step = step
        inputs = trainer.datamodule.preview_images(self.num_images)
        was_training = pl_module.training
        pl_module.eval()
        with trainer.precision_plugin.forward_context():
            reconstructions = pl_module.reconstruct(inputs.to(pl_module.device))
        pl_module.train(was_training)
        # TensorBoard takes no bf16 images: float, clamp, then [0, 1].
        images = torch.cat([inputs, reconstructions.float().cpu()]).clamp(-1, 1).add(1).div(2)
        grid = make_grid(images, nrow=len(inputs), padding=2, pad_value=1.0)
        self.dirpath.mkdir(parents=True, exist_ok=True)
        save_image(grid, self.dirpath / f"recon_step{step:07d}.png")
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("val/reconstructions", grid, global_step=step)
