"""The KL autoencoder stage: Stable Diffusion's AutoencoderKL (seed 001; LDM, Rombach et al. 2022)."""

from __future__ import annotations

import torch

from ldm_lab.nn.frozen_autoencoder import reconstruct
from ldm_lab.stages.autoencoder import AutoencoderStage


class KLAutoencoderStage(AutoencoderStage):
    """Trains on z ~ q(z|x), validates on its mode. ``kl_weight`` multiplies KL(q(z|x) || N(0, I))
    summed over latent elements and averaged over images (diffusers' ``DiagonalGaussianDistribution.kl``).
    The reconstruction is a per-pixel mean (seed 001) while LDM sums it per image, so the same
    ``kl_weight`` weighs the KL about H*W*3 times more here than in LDM's configs."""

    description = "a KL autoencoder (model=vae or vae_tiny)"

    def __init__(self, *args, kl_weight: float = 1.0e-6, **kwargs):
        super().__init__(*args, **kwargs)
        self.kl_weight = kl_weight

    def encode_decode(self, inputs: torch.Tensor):
        posterior = self.vae.encode(inputs).latent_dist
        reconstructions = self.vae.decode(posterior.sample(generator=self.step_generator(inputs.device))).sample
        kl = posterior.kl().mean()
        return reconstructions, self.kl_weight * kl, {"kl": kl.detach()}

    def reconstruct(self, inputs: torch.Tensor) -> torch.Tensor:
        return reconstruct(self.eval_vae, inputs)  # from the posterior's mode
