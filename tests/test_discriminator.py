from __future__ import annotations

import pytest
import torch
from torch import nn

from ldm_lab.nn.discriminator import NLayerDiscriminator


@pytest.mark.parametrize("norm_type,norm_cls,spectral", [
    ("spectral_group", nn.GroupNorm, True),
    ("spectral", None, True),
    ("batch", nn.BatchNorm2d, False),
    ("none", None, False),
])
def test_norm_types(norm_type, norm_cls, spectral):
    disc = NLayerDiscriminator(ndf=64, n_layers=3, norm_type=norm_type)
    convs = [m for m in disc.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 5
    assert all(hasattr(c, "parametrizations") for c in convs) is spectral
    norms = [m for m in disc.modules() if isinstance(m, (nn.GroupNorm, nn.BatchNorm2d))]
    assert (len(norms) == 3) if norm_cls else not norms
    assert all(isinstance(n, norm_cls) for n in norms)
    if not spectral:  # DCGAN init: N(0, 0.02)
        weights = torch.cat([c.weight.flatten() for c in convs])
        assert weights.std().item() == pytest.approx(0.02, rel=0.05)
    logits = disc(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 1, 6, 6)  # a map of patch logits


def test_group_count_is_capped_by_channels():
    disc = NLayerDiscriminator(ndf=8, n_layers=2, norm_type="spectral_group", num_groups=32)
    assert [m.num_groups for m in disc.modules() if isinstance(m, nn.GroupNorm)] == [16, 32]
