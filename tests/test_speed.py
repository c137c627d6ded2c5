"""Speed options (conf/speed): applied from config, and not changing what is computed."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from torch import nn

from ldm_lab.core.errors import ConfigError
from ldm_lab.stages.build import build_stage
from ldm_lab.stages.speed import compile_network, optimizer_options
from ldm_lab.tasks.trainer import build_trainer
from tests.helpers import fit, random_batches


def _stage(compose_cfg, *overrides):
    cfg = compose_cfg(list(overrides))
    L.seed_everything(0, verbose=False)
    return build_stage(cfg.model, cfg.disc, cfg.speed), cfg


def test_options_reach_the_networks_and_the_trainer(compose_cfg, monkeypatch):
    compiled = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, *a, **k: compiled.append(type(self).__name__))
    stage, cfg = _stage(compose_cfg, "speed.channels_last=true", "speed.compile=true", "speed.cudnn_benchmark=false")
    conv = stage.vae.encoder.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    processors = {type(m.processor) for m in stage.vae.modules() if isinstance(m, Attention)}
    assert processors == {AttnProcessor2_0}
    assert compiled == ["AutoencoderKL"]
    build_trainer(cfg, stage)
    assert torch.backends.cudnn.benchmark is False

    plain, plain_cfg = _stage(compose_cfg, "speed.channels_last=false", "speed.sdpa=false")
    build_trainer(plain_cfg, plain)
    assert torch.backends.cudnn.benchmark is True  # the default
    assert plain.vae.encoder.conv_in.weight.is_contiguous()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    auto, _ = _stage(compose_cfg)  # channels_last: auto, on CUDA only
    assert auto.vae.encoder.conv_in.weight.is_contiguous() and not auto.channels_last
    assert {type(m.processor) for m in plain.vae.modules() if isinstance(m, Attention)} == {AttnProcessor}


def test_fused_adamw_only_where_there_is_a_kernel(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert optimizer_options(torch.optim.AdamW, fused=True) == {"fused": True}
    assert optimizer_options(torch.optim.AdamW, fused=False) == {}
    assert optimizer_options(torch.optim.LBFGS, fused=True) == {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert optimizer_options(torch.optim.AdamW, fused=True) == {}


def test_channels_last_and_sdpa_train_to_the_same_weights(compose_cfg):
    common = ["model.max_steps=2", "model.loss.disc_start=0"]
    fast, _ = _stage(compose_cfg, *common, "speed.channels_last=true")
    plain, _ = _stage(compose_cfg, *common, "speed.channels_last=false", "speed.sdpa=false")
    batches = random_batches(2)
    fit(fast, batches)
    fit(plain, batches)
    for (name, a), b in zip(fast.vae.named_parameters(), plain.vae.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5, msg=name)


def test_compile_blocks_compiles_each_repeated_block(compose_cfg, monkeypatch):
    compiled = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, *a, **k: compiled.append(type(self).__name__))
    stage, _ = _stage(compose_cfg, "speed.compile=blocks")
    resnets = sum(type(m).__name__ == "ResnetBlock2D" for m in stage.vae.modules())
    assert resnets > 4 and compiled == ["ResnetBlock2D"] * resnets
    with pytest.raises(ConfigError, match="speed.compile=layers: false, true .* or blocks"):
        compile_network(stage.vae, "layers")


@pytest.mark.slow
def test_compiled_blocks_match_eager_and_stop_recompiling_after_the_second_bucket_shape(tmp_path):
    """PixArt's blocks compiled: four latent shapes (buckets) give eager's outputs; the blocks' shared code compiles
    for the first shape and again with dynamic sides at the second (each twice: the first block's input is strided
    as the patch embedding's transpose leaves it, the others' contiguous), and never again. In an inductor cache of
    its own: kernels another run cached under another ATEN_CPU_CAPABILITY gave NaN here."""
    from diffusers import PixArtTransformer2DModel
    from torch._dynamo.utils import counters
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    torch.manual_seed(0)
    network = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                       num_layers=3, sample_size=8, patch_size=2, caption_channels=12,
                                       cross_attention_dim=16, norm_type="ada_norm_single").eval()
    inputs = [dict(hidden_states=torch.randn(2, 4, h, w), timestep=torch.tensor([10, 900]),
                   encoder_hidden_states=torch.randn(2, 5, 12), added_cond_kwargs={"resolution": None,
                                                                                   "aspect_ratio": None})
              for h, w in [(8, 8), (8, 12), (12, 8), (16, 16)]]
    graphs = []
    with torch.no_grad(), temporary_cache_dir(str(tmp_path / "inductor")):
        eager = [network(**x).sample for x in inputs]
        torch._dynamo.reset()
        counters.clear()
        assert compile_network(network, "blocks") == 3
        compiled = []
        for x in inputs:
            compiled.append(network(**x).sample)
            graphs.append(counters["stats"]["unique_graphs"])
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert graphs == [2, 4, 4, 4]
    torch._dynamo.reset()
