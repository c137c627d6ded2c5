"""Losses on a denoiser's intermediate features, added to its objective (``model.representation.loss``):

- ``dispersive`` (Wang & He 2025, "Diffuse and Disperse"): spreads a batch's features apart; no encoder, no
  parameters.
- ``repa`` (REPA, Yu et al. 2024): a small MLP head projects the features at each position onto a frozen image
  encoder's patch features of the clean image (DINOv2's, ldm_lab/nn/image_encoders.py), scored by their cosine
  similarity; for a UNet the projection is resized to the encoder's patch grid, as U-REPA (Tian et al. 2025) does.
- ``sra`` (SRA, Jiang et al. 2025): the same alignment with the model's own EMA as the encoder: an earlier
  block's features at a noise level are projected onto a later block's features of the EMA at a lower one
  (smooth L1, their release's ``sml1`` with beta 0.05); no encoder.

:class:`RepresentationLoss` is what the latent diffusion stage adds: the features are read by forward hooks on blocks
(:class:`FeatureTap`); the head is trained with the denoiser, saved in checkpoints (``representation.head.*``) and
left out of the export; REPA's image encoder is frozen and kept out of the module tree, so out of checkpoints."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ldm_lab.core.errors import ConfigError
from ldm_lab.nn import denoisers, image_encoders

LOSSES = ("dispersive", "repa", "sra")  # model.representation.loss
WEIGHTS = {"dispersive": 0.25, "repa": 0.5, "sra": 0.2}  # the papers' (the dispersive loss's SiT release)


def dispersive_loss(features: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The InfoNCE-L2 dispersive loss of the paper's public release: log of the mean, over every pair (i, j) of the
    batch with the diagonal, of exp(-||z_i - z_j||^2 / (d tau)), z_i sample i's flattened features of dimension d.
    Minimising it spreads a batch's representations apart, contrastive learning without positive pairs."""
    z = features.flatten(1).float()
    norms = z.square().sum(dim=1)
    distances = (norms[:, None] + norms[None, :] - 2 * z @ z.T).clamp_min(0) / z.shape[1]
    return torch.logsumexp(-distances.flatten() / temperature, dim=0) - math.log(distances.numel())


def repa_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """REPA's: minus the mean cosine similarity, over positions, of ``projected`` and ``target`` (B, C, h, w); a
    projection on another grid than the target's is resized to it (bilinear)."""
    projected = _on_grid(projected, target)
    return -F.cosine_similarity(projected.float(), target.float(), dim=1).mean()


def sra_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SRA's: the smooth L1 distance (beta 0.05) of ``projected`` and ``target`` (B, C, h, w), a projection on
    another grid resized to the target's."""
    projected = _on_grid(projected, target)
    return F.smooth_l1_loss(projected.float(), target.float(), beta=0.05)


def _on_grid(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if projected.shape[2:] == target.shape[2:]:
        return projected
    return F.interpolate(projected, size=target.shape[2:], mode="bilinear", align_corners=False)


def as_grid(features: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """A block's output as a (B, C, h, w) map: a UNet block's as it is, a transformer's tokens (B, h x w, C) laid
    out on the latents' patch grid (``latent_size``: the latents' height and width)."""
    if features.dim() == 4:
        return features
    batch, tokens, width = features.shape
    height, across = latent_size
    patch = math.isqrt(height * across // tokens)
    if patch * patch * tokens != height * across:
        raise ConfigError(f"model.representation: the aligned block gave {tokens} tokens for {height}x{across} "
                          f"latents, not a patch grid: with model.token_routing, align a block outside the routed span "
                          f"(model.representation.block)")
    return features.transpose(1, 2).reshape(batch, width, height // patch, across // patch)


def projection_head(in_width: int, out_width: int, hidden_width: int, layers: int) -> nn.Sequential:
    """An MLP applied at each position of a (B, C, h, w) map: ``layers`` linear layers with SiLU between (REPA's
    projector: 3 layers, 2048 wide; SRA's head: 2 layers, in + out wide)."""
    widths = [in_width, *[hidden_width] * (layers - 1), out_width]
    modules: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:], strict=False)):
        modules += [nn.Linear(a, b)] + ([nn.SiLU()] if i < layers - 1 else [])
    return nn.Sequential(*modules)


def project(head: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """``head`` applied at each position of a (B, C, h, w) map."""
    return head(features.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def output_width(block: nn.Module) -> int:
    """The channels (or token width) a block outputs: its last linear or convolution layer's."""
    for module in reversed(list(block.modules())):
        width = getattr(module, "out_features", None) or getattr(module, "out_channels", None)
        if isinstance(width, int):
            return width
    raise ConfigError(f"model.representation.block: a {type(block).__name__} has no linear or convolution layer to "
                      f"read its width from; align a block of the denoiser (mid_block, transformer_blocks.3, ...)")


class FeatureTap:
    """Keeps the latest output of ``block`` (a forward hook, registered once, so a compiled network keeps its
    graph): :meth:`take` returns it and lets it go."""

    def __init__(self, block: nn.Module):
        self.block, self._output = block, None
        block.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, args, output) -> None:
        self._output = output[0] if isinstance(output, tuple) else output

    def take(self) -> torch.Tensor:
        output, self._output = self._output, None
        if output is None:
            raise RuntimeError("the feature block did not run in this forward pass")
        return output


class RepresentationLoss(nn.Module):
    """``model.representation`` (checked by :func:`options`) on ``denoiser``: its ``name`` and ``weight``, the
    ``block`` it reads (by submodule name) and its hooks (registered after the EMAs' copies, so they carry none;
    SRA's on its teacher, the ``ema``), REPA's ``image_encoder`` and the projection ``head``."""

    def __init__(self, options: dict, denoiser: nn.Module, ema: nn.Module | None):
        super().__init__()
        self.options, self.name, self.weight = options, options["loss"], options["weight"]
        kind = denoisers.backbone(denoiser)
        aligned, teacher_block = kind.alignment_blocks(denoiser)
        default = kind.middle(denoiser) if self.name == "dispersive" else aligned
        self.block = options["block"] or default
        student = denoisers.feature_block(denoiser, self.block)
        self._features, self._teacher_features = FeatureTap(student), None
        object.__setattr__(self, "image_encoder", None)
        self.head: nn.Module | None = None
        if self.name == "sra":
            if ema is None:
                raise ConfigError("model.representation.loss=sra aligns with the EMA's features, and this run keeps "
                                  "no EMA: set model.ema_decay (e.g. 0.9999) or model.posthoc_ema.sigma_rels")
            teacher = denoisers.feature_block(ema, options["teacher_block"] or teacher_block,
                                              "model.representation.teacher_block")
            self._teacher_features = FeatureTap(teacher)
            widths = output_width(student), output_width(teacher)
            self.head = projection_head(*widths, sum(widths), layers=2)
        elif self.name == "repa":
            encoder = image_encoders.load(options["encoder"], options["encoder_weights"], options["patch_pixels"])
            object.__setattr__(self, "image_encoder", encoder)
            self.head = projection_head(output_width(student), encoder.width, options["head_width"], layers=3)

    @property
    def aligned_block(self) -> nn.Module:
        return self._features.block

    def forward(self, batch: dict, latents: torch.Tensor, inputs: dict, objective, generator: torch.Generator,
                teacher: Callable[[torch.Tensor, torch.Tensor], object]) -> torch.Tensor:
        """The loss on the features the training forward left at the aligned block (its input: ``inputs``'
        ``noisy`` latents and ``timesteps``): SRA's target is the EMA's at its teacher block, run by ``teacher``
        (noisy latents, timesteps) on the same noise at less of it (``objective.less_noisy``); REPA's the image
        encoder's, from the feature cache (``batch["image_features"]``) or of the batch's pixels."""
        features = self._features.take()
        if self.name == "dispersive":
            return dispersive_loss(features, self.options["temperature"])
        projected = project(self.head, as_grid(features, latents.shape[2:]))
        if self.name == "sra":
            with torch.no_grad():
                noisy, timesteps = objective.less_noisy(latents, inputs["noisy"], inputs["timesteps"],
                                                        self.options["interval"], generator)
                teacher(noisy, timesteps)
            return sra_loss(projected, as_grid(self._teacher_features.take(), latents.shape[2:]))
        if "image_features" in batch:
            return repa_loss(projected, batch["image_features"])
        return repa_loss(projected, self.image_encoder.to(latents.device)(batch["pixel_values"]))


def options(representation: dict | None) -> dict | None:
    """``model.representation`` checked, its weight the paper's where unset; None when off (no ``loss``)."""
    if not representation or not representation.get("loss"):
        return None
    checked = dict(representation)
    if checked["loss"] not in LOSSES:
        raise ConfigError(f"model.representation.loss={checked['loss']}: null or one of {', '.join(LOSSES)}")
    if not float(checked["temperature"]) > 0:
        raise ConfigError(f"model.representation.temperature={checked['temperature']}: must be above 0")
    if not 0 <= float(checked["interval"]) <= 1:
        raise ConfigError(f"model.representation.interval={checked['interval']}: SRA's share of the noise scale, in "
                          f"[0, 1] (its paper's 0.2)")
    if checked["weight"] is None:
        checked["weight"] = WEIGHTS[checked["loss"]]
    return checked
