"""The VQ autoencoder stage: diffusers' VQModel trained as a VQGAN (Esser et al. 2021; the first
stage of LDM-VQ-4, seed 000)."""

from __future__ import annotations

import torch
from torch import nn

from ldm_lab.nn.codebook import codebook_usage, restart_dead_codes, vq_losses
from ldm_lab.stages.autoencoder import AutoencoderStage


class VQAutoencoderStage(AutoencoderStage):
    """Trains through the straight-through estimator with ``codebook_weight`` x the codebook and
    commitment terms (:func:`~ldm_lab.nn.codebook.vq_losses`). Validation reports the fraction of codes used and the
    perplexity. ``dead_code_restart_every`` > 0 moves codes used fewer than ``dead_code_threshold``
    times in that many generator steps onto recent encoder outputs."""

    description = "a VQ autoencoder (model=vqvae or vqvae_tiny)"

    def __init__(
        self,
        *args,
        codebook_weight: float = 1.0,
        beta: float = 0.25,
        legacy_beta: bool = False,
        dead_code_restart_every: int = 0,
        dead_code_threshold: float = 1.0,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.codebook_weight = codebook_weight
        self.beta = beta
        self.legacy_beta = legacy_beta
        self.dead_code_restart_every = dead_code_restart_every
        self.dead_code_threshold = dead_code_threshold
        num_codes = self.vae.config.num_vq_embeddings
        # Code use since the last restart (training) and in the current validation pass. Plain tensors,
        # not buffers: DDP would overwrite every rank's counts with rank 0's at each forward.
        self.train_code_counts = torch.zeros(num_codes, dtype=torch.long)
        self.val_code_counts = torch.zeros(num_codes, dtype=torch.long)
        self._recent_latents: torch.Tensor | None = None

    @staticmethod
    def _quantize(vae: nn.Module, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(straight-through quantized latents, the codes themselves with their gradient, code indices)."""
        quantized, _, (_, _, indices) = vae.quantize(latents)
        n, dim, height, width = latents.shape
        codes = vae.quantize.embedding(indices.flatten()).view(n, height, width, dim).permute(0, 3, 1, 2)
        return quantized, codes, indices.flatten()

    def encode_decode(self, inputs: torch.Tensor):
        latents = self.vae.encode(inputs).latents  # pre-quantization, after quant_conv
        quantized, codes, indices = self._quantize(self.vae, latents)
        reconstructions = self.vae.decode(quantized, force_not_quantize=True).sample
        vq_loss, codebook, _ = vq_losses(latents, codes, self.beta, self.legacy_beta)
        if self.dead_code_restart_every:
            self.train_code_counts = self.train_code_counts.to(indices.device)
            self.train_code_counts += torch.bincount(indices, minlength=self.train_code_counts.numel())
            self._recent_latents = latents.detach().permute(0, 2, 3, 1).reshape(-1, latents.shape[1]).float()
        # The codebook and commitment terms share their value ||h - e||^2; only their gradients differ.
        return reconstructions, self.codebook_weight * vq_loss, {"quantization_mse": codebook.detach()}

    def on_optimizer_step(self) -> None:
        super().on_optimizer_step()
        if not self.dead_code_restart_every or self.step % self.dead_code_restart_every:
            return
        counts = self.trainer.strategy.reduce(self.train_code_counts.clone(), reduce_op="sum")
        embedding = self.vae.quantize.embedding.weight
        dead = restart_dead_codes(embedding.data, counts, self._recent_latents, self.dead_code_threshold,
                                  generator=self.step_generator(embedding.device))
        embedding.data.copy_(self.trainer.strategy.broadcast(embedding.data))  # every rank, rank 0's codes
        if self.ema is not None:  # the evaluation weights get the restarted codes at once
            self.ema.module.quantize.embedding.weight.data[dead] = embedding.data[dead]
        self.train_code_counts.zero_()
        for logger in self.loggers:
            logger.log_metrics({"train/dead_codes_restarted": int(dead.sum())}, step=self.step)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["ldm_lab"]["train_code_counts"] = self.train_code_counts.cpu()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.train_code_counts = checkpoint["ldm_lab"]["train_code_counts"]

    @torch.no_grad()
    def _reconstruct_with_indices(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vae = self.eval_vae
        quantized, _, indices = self._quantize(vae, vae.encode(inputs).latents)
        return vae.decode(quantized, force_not_quantize=True).sample, indices

    def reconstruct(self, inputs: torch.Tensor) -> torch.Tensor:
        return self._reconstruct_with_indices(inputs)[0]

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self.val_code_counts = torch.zeros_like(self.train_code_counts, device=self.device)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        inputs = batch["pixel_values"]
        reconstructions, indices = self._reconstruct_with_indices(inputs)
        self.val_metrics.update(inputs, reconstructions)
        self.val_code_counts += torch.bincount(indices, minlength=self.val_code_counts.numel())

    def validation_values(self) -> dict[str, torch.Tensor]:
        values = super().validation_values()
        counts = self.trainer.strategy.reduce(self.val_code_counts, reduce_op="sum")
        values["codebook_usage"], values["perplexity"] = codebook_usage(counts)
        return values
