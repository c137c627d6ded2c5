"""Token routing (TREAD) on the DiT and PixArt: the routed tokens skip the span unchanged, the rest go through it;
the same step with gradient checkpointing; training resumes exactly and exports the plain network."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel
from hydra.errors import InstantiationException

from ldm_lab.core.errors import ConfigError
from ldm_lab.io.export import export_pipeline
from ldm_lab.io.model_sources import load_latent_diffusion
from ldm_lab.nn.token_routing import TokenRouter
from ldm_lab.stages.build import build_stage
from tests.conftest import LDM_TINY
from tests.helpers import StopAt, fit_latent_stage, save_tiny_first_stage


def _dit() -> DiTTransformer2DModel:
    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                 num_layers=4, sample_size=8, patch_size=2, num_embeds_ada_norm=2).eval()  # no label dropout


def _pixart() -> PixArtTransformer2DModel:
    torch.manual_seed(0)
    return PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                    num_layers=4, sample_size=8, patch_size=2, caption_channels=12,
                                    cross_attention_dim=16, norm_type="ada_norm_single").eval()


def _inputs(network):
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    timesteps = torch.tensor([10, 500, 900])
    if isinstance(network, PixArtTransformer2DModel):
        return dict(hidden_states=latents, timestep=timesteps, encoder_hidden_states=torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(2)),
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    return dict(hidden_states=latents, timestep=timesteps, class_labels=torch.tensor([0, 1, 2]))


@pytest.mark.parametrize("make", [_dit, _pixart])
def test_routed_tokens_skip_the_span_and_the_others_go_through(make):
    network = make()
    entering, leaving = {}, {}
    network.transformer_blocks[1].register_forward_pre_hook(lambda m, a: entering.__setitem__("in", a[0]))
    network.transformer_blocks[3].register_forward_pre_hook(lambda m, a: leaving.__setitem__("in", a[0]))
    router = TokenRouter(network, ratio=0.5, start=1, end=-1)  # tokens skip blocks 1 and 2
    plain = network(**_inputs(network)).sample
    router.start(torch.Generator().manual_seed(0))
    routed = network(**_inputs(network)).sample
    kept = router._kept
    router.stop()
    assert kept.shape == (3, 8) and entering["in"].shape[1] == 16 == leaving["in"].shape[1]
    skipped = torch.ones(3, 16, dtype=torch.bool).scatter(1, kept, False)
    assert torch.equal(leaving["in"][skipped], entering["in"][skipped])  # unchanged past the span
    assert not torch.allclose(leaving["in"][~skipped], entering["in"][~skipped])  # the kept ones went through
    assert not torch.allclose(routed, plain)
    torch.testing.assert_close(network(**_inputs(network)).sample, plain)  # after stop(): the plain network again


def test_gradient_checkpointing_recomputes_with_the_same_tokens():
    def grads(checkpointing: bool):
        network = _dit()
        if checkpointing:
            network.enable_gradient_checkpointing()
        router = TokenRouter(network, ratio=0.5, start=1, end=3)
        router.start(torch.Generator().manual_seed(0))
        network(**_inputs(network)).sample.square().mean().backward()
        router.stop()
        return [p.grad for p in network.parameters()]

    for a, b in zip(grads(False), grads(True), strict=True):
        torch.testing.assert_close(a, b)


@pytest.fixture
def first_stage(tmp_path):
    return save_tiny_first_stage("kl", tmp_path / "first_stage")


def test_routed_dit_trains_resumes_exactly_and_exports_plainly(compose_cfg, first_stage, tmp_path):
    cfg = compose_cfg([*LDM_TINY, "model=dit_tiny", f"model.first_stage={first_stage}", "model.max_steps=4",
                       "model.token_routing.ratio=0.5", "model.token_routing.start=0", "model.token_routing.end=1"],
                      tiny=False)
    batches = [{"latents": torch.randn(4, 8, 8, 8)}]

    def run(root, callbacks=(), ckpt_path=None):
        return fit_latent_stage(cfg.model, batches, root, callbacks, ckpt_path)

    straight = run(tmp_path / "straight")
    stopped = tmp_path / "stopped.ckpt"
    run(tmp_path / "killed", [StopAt(2, stopped)])
    resumed = run(tmp_path / "killed", ckpt_path=stopped)
    for x, y in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    loaded = load_latent_diffusion(export_pipeline(resumed.pipeline(), tmp_path / "export"), "test").unet
    assert type(loaded) is DiTTransformer2DModel and not loaded.transformer_blocks[0]._forward_pre_hooks


def test_routing_is_refused_where_it_cannot_route(compose_cfg, first_stage):
    with pytest.raises(InstantiationException, match="UNet2DModel has no transformer blocks .* model=dit"):
        build_stage(compose_cfg([*LDM_TINY, f"model.first_stage={first_stage}", "model.token_routing.ratio=0.5"],
                                tiny=False).model, None)
    with pytest.raises(ConfigError, match=r"blocks \[start, end\) = \[3, 2\) within the network's 4"):
        TokenRouter(_dit(), 0.5, 3, 2)


def test_alignment_of_a_routed_block_is_refused_when_built(compose_cfg, first_stage):
    routed = [*LDM_TINY, "model=dit_tiny", f"model.first_stage={first_stage}", "model.token_routing.ratio=0.5",
              "model.token_routing.start=0", "model.token_routing.end=1", "model.representation.loss=sra",
              "model.representation.teacher_block=transformer_blocks.1"]
    with pytest.raises(InstantiationException, match=r"block=transformer_blocks.0 lies in the blocks \[0, 1\)"):
        build_stage(compose_cfg([*routed, "model.representation.block=transformer_blocks.0"], tiny=False).model, None)
    stage = build_stage(compose_cfg([*routed, "model.representation.block=transformer_blocks.1"], tiny=False).model, None)
    assert stage.representation.block == "transformer_blocks.1"
