"""PatchGAN discriminator (Isola et al. 2017, pix2pix's NLayerDiscriminator) with the four norm
types of seed 001. Spectral norm bounds the Lipschitz constant; GroupNorm does not depend on the
batch, which matters at the 4060 Ti's batch size of 1 where BatchNorm's statistics are noise."""

from __future__ import annotations

from enum import Enum

from torch import nn


class NormType(str, Enum):
    """PatchGAN normalisation (seed 001): spectral norm on every conv, plus GroupNorm or BatchNorm."""

    spectral_group = "spectral_group"
    spectral = "spectral"
    batch = "batch"
    none = "none"


class NLayerDiscriminator(nn.Module):
    """Maps an image to a map of per-patch real/fake logits (70x70 receptive field at n_layers=3)."""

    def __init__(
        self,
        in_channels: int = 3,
        ndf: int = 64,
        n_layers: int = 3,
        norm_type: NormType | str = NormType.spectral_group,
        num_groups: int = 32,
    ):
        super().__init__()
        self.norm_type = NormType(norm_type)
        use_spectral = self.norm_type in (NormType.spectral, NormType.spectral_group)

        def conv(c_in: int, c_out: int, stride: int, bias: bool) -> nn.Module:
            layer = nn.Conv2d(c_in, c_out, kernel_size=4, stride=stride, padding=1, bias=bias)
            return nn.utils.parametrizations.spectral_norm(layer) if use_spectral else layer

        def norm(channels: int) -> nn.Module:
            if self.norm_type is NormType.spectral_group:
                return nn.GroupNorm(min(num_groups, channels), channels)
            if self.norm_type is NormType.batch:
                return nn.BatchNorm2d(channels)
            return nn.Identity()

        # A conv has no bias where a norm layer follows it with its own shift.
        has_norm = self.norm_type in (NormType.spectral_group, NormType.batch)
        layers: list[nn.Module] = [conv(in_channels, ndf, 2, bias=True), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the penultimate conv keeps the resolution
            layers += [conv(ndf * prev, ndf * mult, stride, bias=not has_norm), norm(ndf * mult),
                       nn.LeakyReLU(0.2, True)]
        layers.append(conv(ndf * mult, 1, 1, bias=True))
        self.model = nn.Sequential(*layers)
        if not use_spectral:  # spectral-normed layers regulate their own scale
            self.apply(_init_weights)

    def forward(self, sample):
        return self.model(sample)


def _init_weights(module: nn.Module) -> None:
    """DCGAN init: convs N(0, 0.02), norm scales N(1, 0.02), norm shifts 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
