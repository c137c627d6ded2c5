"""The autoencoder objective of seed 001 / LDM / VQGAN: reconstruction + LPIPS + the latent's
regularisation (KL or codebook terms, weighted by the stage) + adaptive adversarial.

The reconstruction and LPIPS terms are means over pixels and images (seed 001); the stage's
regularisation term is added as given, so its weight is relative to these per-pixel means.
"""

from __future__ import annotations

import logging
from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn

from ldm_lab.core.weights import MissingWeightsError
from ldm_lab.losses.adversarial import (
    D_LOSSES,
    adaptive_weight,
    generator_adversarial_loss,
)
from ldm_lab.losses.perceptual import LPIPS

log = logging.getLogger(__name__)


class RecLoss(str, Enum):
    l1 = "l1"
    l2 = "l2"


class DiscLoss(str, Enum):
    hinge = "hinge"
    vanilla = "vanilla"


class AutoencoderLoss(nn.Module):
    """Generator and discriminator losses, counted in generator optimizer steps for ``disc_start``."""

    def __init__(
        self,
        rec_loss: RecLoss | str = RecLoss.l1,
        perceptual_weight: float = 0.5,
        require_perceptual_weights: bool = True,
        disc_weight: float = 0.5,
        disc_start: int = 50001,
        disc_factor: float = 1.0,
        disc_loss: DiscLoss | str = DiscLoss.hinge,
        max_adaptive_weight: float = 10.0,
        lpips_backbone: str = "pretrained",
        vgg16_weights: str | None = None,
    ):
        super().__init__()
        self.rec_loss = RecLoss(rec_loss)
        self.disc_weight = disc_weight
        self.disc_start = disc_start
        self.disc_factor = disc_factor
        self.d_loss = D_LOSSES[DiscLoss(disc_loss).value]
        self.max_adaptive_weight = max_adaptive_weight
        self.perceptual_weight = perceptual_weight
        self.perceptual: LPIPS | None = None
        if perceptual_weight > 0:
            try:
                # Frozen and loaded from its own file: kept out of the module tree (and so out of
                # every checkpoint); generator_loss moves it to the inputs' device.
                object.__setattr__(self, "perceptual", LPIPS(lpips_backbone, vgg16_weights))
            except MissingWeightsError as error:
                if require_perceptual_weights:
                    raise MissingWeightsError(f"{error} Or train without LPIPS: model.loss.perceptual_weight=0 "
                                              f"model.metrics.lpips=false (require_weights=false warns and goes on "
                                              f"without it)") from None
                log.warning("training WITHOUT the LPIPS term: %s", error)
                self.perceptual_weight = 0.0

    def adversarial_active(self, gen_step: int) -> bool:
        """Whether the GAN terms are on at this generator step (both networks share the switch)."""
        return self.disc_factor > 0 and gen_step >= self.disc_start

    def generator_loss(
        self,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        reg_loss: torch.Tensor,
        discriminator: nn.Module,
        last_layer: torch.Tensor,
        gen_step: int,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total generator loss and its detached parts; ``reg_loss`` is the stage's weighted latent term."""
        if self.rec_loss is RecLoss.l1:
            rec = F.l1_loss(reconstructions, inputs)
        else:
            rec = F.mse_loss(reconstructions, inputs)
        nll = rec
        logs = {"rec": rec.detach()}
        if self.perceptual is not None and self.perceptual_weight > 0:
            p_loss = self.perceptual.to(inputs.device)(reconstructions, inputs).mean()
            nll = nll + self.perceptual_weight * p_loss
            logs["lpips"] = p_loss.detach()
        total = nll + reg_loss
        if self.adversarial_active(gen_step):
            g_loss = generator_adversarial_loss(discriminator(reconstructions))
            d_weight = self.disc_weight * adaptive_weight(nll, g_loss, last_layer, self.max_adaptive_weight)
            total = total + d_weight * self.disc_factor * g_loss
            logs.update(g_adv=g_loss.detach(), d_weight=d_weight)
        logs["total"] = total.detach()
        return total, logs

    def discriminator_loss(
        self, discriminator: nn.Module, inputs: torch.Tensor, reconstructions: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The discriminator sees detached reconstructions: its loss sends no gradient to the VAE."""
        logits_real = discriminator(inputs.detach())
        logits_fake = discriminator(reconstructions.detach())
        loss = self.disc_factor * self.d_loss(logits_real, logits_fake)
        return loss, {
            "d_loss": loss.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }
