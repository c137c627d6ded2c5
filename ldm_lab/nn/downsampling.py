"""How far a diffusers autoencoder or UNet downsamples, from its config: the one place the formula lives."""

from __future__ import annotations


def downsampling(config) -> int:
    """Pixels (or latents) per output position: 2 ** (levels - 1) of ``block_out_channels``. ``config``: a
    diffusers model's config, a composed config's model section, or a plain dict."""
    return 2 ** (len(config["block_out_channels"]) - 1)
