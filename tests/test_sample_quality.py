"""The offline sample-quality metric (issue 12): precision/recall and FID in a feature network's embedding
beside their data-vs-data floor, the synthetic data's feature network, and task=evaluate without Inception.
And the recipe options the quickstart is measured with: min-SNR-gamma, logit-normal timesteps, zero terminal SNR."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr
from torch import nn

from ldm_lab.config.validate import ConfigError
from ldm_lab.data.synthetic import NUM_ATTRIBUTES, draw_image
from ldm_lab.evaluation.metrics import SampleQuality, precision_recall
from ldm_lab.evaluation.synthetic_features import (
    NUM_TARGETS,
    degrade,
    explained_variance,
    load_feature_net,
    render,
    train_feature_net,
)
from ldm_lab.nn.feature_net import FeatureNet
from ldm_lab.stages.build import build_stage
from tests.conftest import LDM_TINY
from tests.helpers import save_tiny_first_stage


def test_precision_recall_tell_fidelity_from_coverage():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(400, 8, generator=g)
    same = precision_recall(real, torch.randn(400, 8, generator=g))
    collapsed = precision_recall(real, torch.randn(400, 8, generator=g) * 0.1)  # one mode, inside the data
    elsewhere = precision_recall(real, torch.randn(400, 8, generator=g) + 5)
    assert same[0] > 0.7 and same[1] > 0.7
    assert collapsed[0] > 0.95 and collapsed[1] < 0.2
    assert elsewhere[0] < 0.05 and elsewhere[1] < 0.05


class Flatten(nn.Module):
    def forward(self, images):
        return F.avg_pool2d(images, 4).flatten(1)


def test_sample_quality_reports_the_floor_of_held_out_real_images():
    """Samples from the data's own distribution score as the floor does; collapsed samples far worse."""
    g = torch.Generator().manual_seed(0)

    def real(n):  # 12 features: 2x2 means of 3 channels
        return torch.rand(n, 3, 8, 8, generator=g) * 2 - 1

    reference, held_out = real(256), real(100)
    results = {}
    for name, samples in (("good", real(64)), ("collapsed", real(1).expand(64, -1, -1, -1))):
        quality = SampleQuality(Flatten())
        quality.update(reference, "reference")
        quality.update(held_out, "held_out")
        quality.update(samples, "samples")
        results[name] = quality.compute()
    good, collapsed = results["good"], results["collapsed"]
    assert good["held_out_images"] == good["samples"] == 64 and good["reference_images"] == 256
    assert good["fid"] < 3 * good["floor_fid"] + 1e-3 and good["recall"] > 0.5
    assert collapsed["fid"] > 10 * collapsed["floor_fid"] and collapsed["recall"] < 0.1
    assert collapsed["floor_fid"] == pytest.approx(good["floor_fid"])  # the floor does not depend on the samples


def test_the_floor_spreads_over_held_out_images_that_come_sorted_by_class():
    """A folder of classes indexes its images class after class: the floor's held-out images are taken from
    all of them, not the first classes' (which made the floor 114 against samples of 28 at the class quickstart)."""
    g = torch.Generator().manual_seed(0)

    def of_class(label, n):  # two classes far apart in the embedding
        return torch.rand(n, 3, 8, 8, generator=g) * 0.5 - 0.75 + label

    quality = SampleQuality(Flatten())
    quality.update(torch.cat([of_class(0, 128), of_class(1, 128)]), "reference")
    quality.update(torch.cat([of_class(0, 100), of_class(1, 100)]), "held_out")  # sorted by class
    quality.update(torch.cat([of_class(0, 32), of_class(1, 32)]), "samples")
    results = quality.compute()
    assert results["held_out_images"] == 64
    assert results["floor_fid"] < 3 * results["fid"] + 1e-3 and results["floor_recall"] > 0.5


def test_draw_image_reports_what_it_drew_without_changing_the_picture():
    image, drawn = draw_image(np.random.default_rng([0, 3]), 48, 40)
    again, _ = draw_image(np.random.default_rng([0, 3]), 48, 40)
    assert image.size == (48, 40) and np.array_equal(np.asarray(image), np.asarray(again))
    assert drawn.shape == (NUM_ATTRIBUTES,) and drawn.min() >= -1 and drawn.max() <= 1
    counts = (drawn[8:12] + 1) * 4  # shapes of each kind
    assert counts.sum() == pytest.approx(round(counts.sum())) and 3 <= round(counts.sum()) <= 8


def test_the_feature_network_learns_to_read_the_drawing_and_tells_blur_apart():
    torch.manual_seed(0)
    net, r2 = train_feature_net(resolution=32, steps=400, num_renders=1024)
    images, targets = render(256, 32, seed=7)
    assert r2 > 0.5 and explained_variance(FeatureNet(NUM_TARGETS, 32), images, targets) < 0.1
    with torch.no_grad():  # its last output: a render, or a spoilt one
        realness = torch.sigmoid(net.predict(images)[:, -1])
        spoilt = torch.sigmoid(net.predict(degrade(images, torch.Generator().manual_seed(0)))[:, -1])
    assert realness.mean() > 0.6 and spoilt.mean() < 0.4, (realness.mean(), spoilt.mean())
    unseen = render(128, 32, seed=9)[0]
    blurred = F.avg_pool2d(unseen, 4).repeat_interleave(4, -1).repeat_interleave(4, -2)
    scores = {}
    for name, samples in (("unseen", unseen), ("blurred", blurred)):
        quality = SampleQuality(net)
        quality.update(images, "reference")
        quality.update(render(128, 32, seed=8)[0], "held_out")
        quality.update(samples, "samples")
        scores[name] = quality.compute()
    assert scores["unseen"]["fid"] < 1.5 * scores["unseen"]["floor_fid"]
    assert scores["blurred"]["fid"] > 3 * scores["unseen"]["fid"]


def test_the_feature_network_is_trained_once_and_cached(tmp_path, monkeypatch):
    import ldm_lab.evaluation.synthetic_features as synthetic_features

    calls = []
    train = synthetic_features.train_feature_net
    monkeypatch.setattr(synthetic_features, "train_feature_net",
                        lambda *args, **kwargs: calls.append(args) or train(*args, **kwargs))
    first, described = load_feature_net(tmp_path, 32, steps=20)
    second, again = load_feature_net(tmp_path, 32, steps=20)
    assert len(calls) == 1 and described == again and "R^2" in described
    images = render(4, 32, seed=1)[0]
    assert torch.equal(first(images), second(images))


# ------------------------------------------------------------------------------------------- recipe options
def _stage(compose_cfg, tmp_path, *overrides):
    cfg = compose_cfg([*LDM_TINY, f"model.first_stage={save_tiny_first_stage('vq', tmp_path / 'vq')}", *overrides],
                      tiny=False)
    stage = build_stage(cfg.model, cfg.disc)
    stage.latent_scale.fill_(1.0)
    return stage


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_gamma_weights_each_image_by_its_timestep(compose_cfg, tmp_path, prediction_type):
    stage = _stage(compose_cfg, tmp_path, "model.objective.snr_gamma=1", f"model.objective.noise_scheduler.prediction_type={prediction_type}")
    latents = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    weighted = stage.loss(stage.denoiser, latents, torch.Generator().manual_seed(1), training=True)
    plain = stage.loss(stage.denoiser, latents, torch.Generator().manual_seed(1))

    g = torch.Generator().manual_seed(1)  # the same draws as loss_simple's
    noise = torch.randn(latents.shape, generator=g)
    timesteps = torch.randint(0, 1000, (16,), generator=g)
    scheduler = stage.objective.noise_scheduler
    with torch.no_grad():
        prediction = stage.denoiser(scheduler.add_noise(latents, noise, timesteps), timesteps).sample
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    per_image = (prediction - target).pow(2).mean(dim=(1, 2, 3))
    snr = compute_snr(scheduler, timesteps)
    weight = snr.clamp(max=1) / (snr if prediction_type == "epsilon" else snr + 1)
    assert (weight < 0.99).any()
    assert float(plain) == pytest.approx(float(per_image.mean()), rel=1e-5)
    assert float(weighted) == pytest.approx(float((per_image * weight).mean()), rel=1e-5)
    assert float(weighted) != pytest.approx(float(plain), rel=1e-3)


def test_logit_normal_density_draws_the_training_timesteps_and_validation_stays_uniform(compose_cfg, tmp_path):
    stage = _stage(compose_cfg, tmp_path, "model.objective.timestep_density.weighting_scheme=logit_normal",
                   "model.objective.timestep_density.logit_mean=-3", "model.objective.timestep_density.logit_std=0.05")
    drawn = []

    def predict(noisy, timesteps):  # records the timesteps each loss draws
        drawn.append(timesteps)
        return torch.zeros_like(noisy)

    latents = torch.randn(256, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    stage.objective.loss(predict, latents, torch.Generator().manual_seed(1), training=True)
    stage.objective.loss(predict, latents, torch.Generator().manual_seed(1))
    training, validation = drawn
    expected = 1000 / (1 + np.exp(3))  # 1000 x sigmoid(-3): 47
    assert training.min() >= expected * 0.7 and training.max() <= expected * 1.3
    assert validation.min() < 100 and validation.max() > 900
    with pytest.raises(Exception, match="model.objective.timestep_density.weighting_scheme=lognormal"):
        _stage(compose_cfg, tmp_path, "model.objective.timestep_density.weighting_scheme=lognormal")


def test_zero_terminal_snr_needs_v_prediction_and_samples_from_the_last_timestep(compose_cfg, tmp_path):
    zero_snr = ["model.objective.noise_scheduler.rescale_betas_zero_snr=true", "model.objective.ddim.timestep_spacing=trailing",
                "model.objective.ddim.steps_offset=0"]
    with pytest.raises(Exception, match="prediction_type=v_prediction") as refused:
        _stage(compose_cfg, tmp_path, *zero_snr)
    assert "rescale_betas_zero_snr" in str(refused.value)
    stage = _stage(compose_cfg, tmp_path, *zero_snr, "model.objective.noise_scheduler.prediction_type=v_prediction")
    assert float(stage.objective.noise_scheduler.alphas_cumprod[-1]) == pytest.approx(0, abs=1e-12)
    scheduler = stage.objective.sampling_scheduler
    scheduler.set_timesteps(10)
    assert scheduler.timesteps[0] == 999 and scheduler.config.rescale_betas_zero_snr
    default = _stage(compose_cfg, tmp_path).objective.sampling_scheduler
    default.set_timesteps(10)
    assert default.timesteps[0] == 901  # LDM's DDIMSampler: leading spacing plus one


def test_evaluate_without_inception_uses_the_feature_network_and_reports_the_floor(compose_cfg, tmp_path,
                                                                                     monkeypatch):
    from ldm_lab.tasks import evaluate, sample_metrics, train

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-weights"))
    ldm = [*LDM_TINY, f"model.first_stage={save_tiny_first_stage('vq', tmp_path / 'vq')}",
           "data.source.num_images=40", "data.num_val=4"]
    train.run(compose_cfg([*ldm, "max_steps=1", "val_every_n_steps=1", "sample.num_images=1"], tiny=False))
    results = evaluate.run(compose_cfg([*ldm, "task=evaluate", f"evaluate.model={tmp_path / 'run' / 'export'}",
                                        "evaluate.num_samples=8", f"paths.output_dir={tmp_path / 'eval'}"],
                                       tiny=False))
    assert results["features"] == "synthetic" and results["samples"] == results["held_out_images"] == 8
    assert results["reference_images"] == 18 and results["fid"] > results["floor_fid"] > 0
    assert "synthetic feature network" in (tmp_path / "eval" / "evaluation.md").read_text()
    assert len(list((tmp_path / "data" / "fid_reference").glob("synthetic-features-v2-32px-*.safetensors"))) == 1

    class NotSynthetic:
        source = type("Folder", (), {"name": "photos"})()

    cfg = compose_cfg(["task=evaluate", "evaluate.features=synthetic"], tiny=False)
    with pytest.raises(ConfigError, match="evaluate.features=synthetic: .* photos is not that data"):
        sample_metrics._features(cfg, NotSynthetic())
    with pytest.raises(ConfigError, match="evaluate.features=fid: choose one of auto, inception, synthetic"):
        evaluate.run(compose_cfg(["task=evaluate", "evaluate.features=fid", "evaluate.model=x"], tiny=False))
