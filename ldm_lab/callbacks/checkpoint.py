"""Checkpoints of a run: ``best.ckpt`` on the stage's monitor, ``last.ckpt`` at every validation and at
the final step."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint rewrites ``last.ckpt`` only when it also saved a top-k checkpoint (so,
    with ``save_top_k: 1``, only when the monitor improved) and at the end only if it never saved one.
    Here ``last.ckpt`` always holds the latest validation step, and the final step when training ends
    between validations: a killed run loses at most ``val_every_n_steps`` steps."""

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._should_skip_saving_checkpoint(trainer) or self._should_save_on_train_epoch_end(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
