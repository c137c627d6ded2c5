"""Representation losses on the denoiser's features: the dispersive loss against its public release's formula, and
training, resuming and exporting with it on the UNet and the DiT."""

from __future__ import annotations

import pytest
import torch
from hydra.errors import InstantiationException

from ldm_lab.io.export import export_pipeline
from ldm_lab.io.model_sources import load_latent_diffusion
from ldm_lab.losses.representation import dispersive_loss
from ldm_lab.stages.build import build_stage
from tests.conftest import LDM_TINY
from tests.helpers import StopAt, fit_latent_stage, save_tiny_first_stage


def _released(z: torch.Tensor) -> torch.Tensor:
    """The release's InfoNCE-L2 code: the condensed pairwise distances twice and the diagonal's zeros, as the full
    B x B matrix of its JAX original."""
    z = z.reshape(z.shape[0], -1)
    diff = torch.nn.functional.pdist(z).pow(2) / z.shape[1]
    diff = torch.cat((diff, diff, torch.zeros(z.shape[0])))
    return torch.log(torch.exp(-diff).mean())


def test_dispersive_loss_is_the_releases_and_spreads_features():
    features = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(dispersive_loss(features), _released(features))
    torch.testing.assert_close(dispersive_loss(features, temperature=0.5), _released(features * 2**0.5))
    close = features * 0.1  # features closer together score higher; a gradient step moves them apart
    assert dispersive_loss(close) > dispersive_loss(features)
    moved = close.clone().requires_grad_(True)
    dispersive_loss(moved).backward()
    with torch.no_grad():
        assert torch.pdist((moved - moved.grad).flatten(1)).min() > torch.pdist(close.flatten(1)).min()
    assert torch.isfinite(moved.grad).all()


@pytest.fixture
def first_stage(tmp_path):
    return save_tiny_first_stage("kl", tmp_path / "first_stage")


@pytest.mark.parametrize("model", ["unet_tiny", "dit_tiny"])
def test_dispersive_training_changes_the_step_resumes_exactly_and_exports_plainly(compose_cfg, first_stage, tmp_path,
                                                                                  model):
    def cfg(*overrides):
        return compose_cfg([*LDM_TINY, f"model={model}", f"model.first_stage={first_stage}", "model.max_steps=4",
                            *overrides], tiny=False)

    batches = [{"latents": torch.randn(4, 8, 8, 8)}]  # one batch an epoch: the resumed run sees what the other did

    def run(config, root, callbacks=(), ckpt_path=None):
        return fit_latent_stage(config.model, batches, root, callbacks, ckpt_path)

    dispersive = cfg("model.representation.loss=dispersive")
    straight = run(dispersive, tmp_path / "straight")
    plain = run(cfg(), tmp_path / "plain")
    pairs = zip(straight.denoiser.parameters(), plain.denoiser.parameters(), strict=True)
    assert any(not torch.equal(a, b) for a, b in pairs)  # the loss reaches the weights
    stopped = tmp_path / "stopped.ckpt"
    run(dispersive, tmp_path / "killed", [StopAt(2, stopped)])
    resumed = run(dispersive, tmp_path / "killed", ckpt_path=stopped)
    for x, y in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    export = export_pipeline(resumed.pipeline(), tmp_path / "export")
    loaded = load_latent_diffusion(export, "test").unet
    assert not loaded._forward_hooks and loaded.state_dict().keys() == plain.ema.module.state_dict().keys()


def test_representation_options_are_refused_with_the_fix(compose_cfg, first_stage):
    def build(*overrides):
        return build_stage(compose_cfg([*LDM_TINY, f"model.first_stage={first_stage}", *overrides], tiny=False).model,
                           None)

    with pytest.raises(InstantiationException, match="representation.block=up_block: UNet2DModel has no such "
                                                     "submodule; its blocks: .*mid_block"):
        build("model.representation.loss=dispersive", "model.representation.block=up_block")
    with pytest.raises(InstantiationException, match="representation.loss=disperse: null or one of dispersive"):
        build("model.representation.loss=disperse")
    stage = build("model=dit_tiny", "model.representation.loss=dispersive", "model.representation.block=transformer_blocks.0")
    assert stage._features is not None
