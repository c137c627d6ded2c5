"""Codebook health for vector-quantized autoencoders: usage, perplexity and dead-code restarts."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def vq_losses(latents: torch.Tensor, codes: torch.Tensor, beta: float, legacy_beta: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weighted VQ loss, codebook term, commitment term) for encoder outputs ``latents`` and their
    nearest ``codes``. The codebook term ||sg[h] - e||^2 moves the codes, the commitment term
    ||h - sg[e]||^2 the encoder (van den Oord et al. 2017); beta weighs the commitment term, or with
    ``legacy_beta`` the codebook term, as taming-transformers and diffusers' ``legacy=True`` do."""
    codebook = F.mse_loss(codes.float(), latents.detach().float())
    commitment = F.mse_loss(latents.float(), codes.detach().float())
    if legacy_beta:
        return beta * codebook + commitment, codebook, commitment
    return codebook + beta * commitment, codebook, commitment


def codebook_usage(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fraction of codes used at least once, perplexity) from per-code counts. Perplexity is
    exp(entropy) of the code distribution: the number of equally used codes it is worth, between 1
    (collapse onto one code) and the codebook size (uniform use)."""
    counts = counts.double()
    probs = counts / counts.sum().clamp_min(1)
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum()
    return (counts > 0).double().mean(), entropy.exp()


@torch.no_grad()
def restart_dead_codes(
    embedding: torch.Tensor, counts: torch.Tensor, recent_latents: torch.Tensor, threshold: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Move every code used fewer than ``threshold`` times onto a random recent encoder output (the
    codebook restart of Dhariwal et al. 2020, Jukebox; Zeghidour et al. 2021, SoundStream), in place.
    ``embedding`` is (num_codes, dim), ``recent_latents`` (num_vectors, dim). Returns the dead codes' mask."""
    dead = counts < threshold
    num_dead = int(dead.sum())
    if num_dead:
        picks = torch.randint(len(recent_latents), (num_dead,), generator=generator, device=recent_latents.device)
        embedding[dead] = recent_latents[picks].to(embedding.dtype)
    return dead
