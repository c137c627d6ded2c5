"""An LDM's samples measured as task=evaluate reports them (the evaluation of a pipeline, shared by task=evaluate and
task=ema_sweep): FID of N samples against the training images, in Inception's embedding or, on the embedded
synthetic data, the lab's own feature network with precision/recall and the data-vs-data floor; a class-conditional
model's samples spread evenly over its classes, a text-conditional model's drawn from the training captions, at
guidance 1 and at ``sample.guidance_scale``, with their class accuracy or prompt adherence and CLIP score."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torchmetrics.multimodal import CLIPScore
from tqdm import tqdm

from ldm_lab.core.errors import ConfigError
from ldm_lab.core.weights import MissingWeightsError, find_weights, missing_message
from ldm_lab.data.synthetic import SyntheticSource
from ldm_lab.diffusion.sampling import SamplingOptions, generate
from ldm_lab.evaluation.classes import correct, load_classifier, spread_labels
from ldm_lab.evaluation.clip_score import as_clip_images, load_clip_score
from ldm_lab.evaluation.metrics import SampleQuality, make_fid
from ldm_lab.evaluation.offline import FloorSamples, InceptionSamples
from ldm_lab.evaluation.prompt_adherence import CHOICES, adheres, fact_matches, load_reader
from ldm_lab.evaluation.synthetic_features import class_logits, load_feature_net
from ldm_lab.nn.denoisers import side_multiple
from ldm_lab.tasks.trainer import build_datamodule

FEATURES = ("auto", "inception", "synthetic")  # evaluate.features: the embedding of an LDM's sample FID

log = logging.getLogger(__name__)


def evaluation_datamodule(cfg: DictConfig, downsample_factor: int):
    datamodule = build_datamodule(cfg, downsample_factor)
    datamodule.prepare_data()
    datamodule.setup("validate")
    return datamodule


def reference_path(cfg: DictConfig, datamodule, split: str, count: int) -> Path:
    name = "".join(c if c.isalnum() else "_" for c in datamodule.source.name)
    return Path(cfg.evaluate.reference_dir) / f"{name}-{split}{count}-{datamodule.resolution}px-inception2048.npz"


def _features(cfg: DictConfig, datamodule) -> tuple[str, Path | None]:
    """Which embedding measures samples: Inception when its weights are present, else on the embedded
    synthetic data the lab's own feature network (evaluate.features=auto); and Inception's weights."""
    weights = find_weights("inception", cfg.paths.weights.inception)
    synthetic = isinstance(datamodule.source, SyntheticSource)
    features = cfg.evaluate.features
    if features == "auto":
        features = "inception" if weights is not None or not synthetic else "synthetic"
    if features == "inception" and weights is None:  # FID is the only metric of a generative model here
        offline = "evaluate.features=synthetic (its own feature network)" if synthetic else None
        raise MissingWeightsError(missing_message("inception", cfg.paths.weights.inception, offline))
    if features == "synthetic" and not synthetic:
        raise ConfigError(f"evaluate.features=synthetic: its feature network reads the embedded synthetic data's "
                          f"drawings, and {datamodule.source.name} is not that data; use evaluate.features=inception")
    return features, weights


def _sample_metric(cfg: DictConfig, datamodule, device: torch.device, num_classes: int | None
                   ) -> tuple[str, InceptionSamples | FloorSamples, list[str]]:
    """The embedding samples are measured in (:func:`_features`), with the real images' side filled in, and what
    the report should say of it; on the captioned synthetic data the prompt reader's
    (:mod:`~ldm_lab.evaluation.prompt_adherence`)."""
    features, weights = _features(cfg, datamodule)
    if features == "inception":
        reference = reference_path(cfg, datamodule, "train", int((~datamodule.is_val).sum()))
        return features, InceptionSamples(make_fid(2048, str(weights)).to(device), datamodule.reference_dataloader(),
                                          reference), []
    if datamodule.captioned:
        reader, described = load_reader(cfg.evaluate.reference_dir, datamodule.resolution)
        metric = FloorSamples(SampleQuality(reader), datamodule.reference_dataloader(), cfg.evaluate.num_samples)
        return features, metric, [f"features and prompt adherence: {described}, not Inception: these figures "
                                  f"compare only with each other. floor_*: held-out real images in the samples' place"]
    feature_net, described = load_feature_net(cfg.evaluate.reference_dir, datamodule.resolution,
                                               num_classes=num_classes or 0)
    classify = (lambda images: class_logits(feature_net, images)) if num_classes else None
    metric = FloorSamples(SampleQuality(feature_net), datamodule.reference_dataloader(), cfg.evaluate.num_samples,
                          classify)
    what = "features and classes" if num_classes else "features"
    return features, metric, [f"{what}: {described}, not Inception: these figures compare only with each other. "
                              f"floor_*: held-out real images in the samples' place"]


def measure_samples(cfg: DictConfig, pipeline, device: torch.device) -> tuple[dict, list[str], str]:
    """FID of ``evaluate.num_samples`` samples (drawn as ``sample.*`` says) against the training images. A
    class-conditional model's samples are spread evenly over the classes and drawn at guidance 1 and at
    ``sample.guidance_scale`` (or at ``evaluate.guidance_scales``), from the same noise at each: FID (and, in the
    synthetic features, precision/recall against the floor, and per class where a class has enough samples) and the
    share of samples a classifier tells as their class. The results, the notes on them and the data's name."""
    datamodule = evaluation_datamodule(cfg, pipeline.downsample_factor * side_multiple(pipeline.unet))
    options = SamplingOptions.from_config(cfg.sample)
    class_names = list(pipeline.config.class_names) or None
    if class_names is not None and datamodule.class_names != class_names:
        raise ConfigError(f"evaluate.model draws the classes {class_names[:8]}..., the data has "
                          f"{(datamodule.class_names or [])[:8]}: evaluate it on the data it was trained on")
    num_samples = cfg.evaluate.num_samples
    features, metric, notes = _sample_metric(cfg, datamodule, device, class_names and len(class_names))
    height, width = options.size((datamodule.resolution, datamodule.resolution))
    results: dict = {"features": features, "resolution": f"{width}x{height}", "sampler": options.sampler,
                     "steps": options.num_inference_steps}
    labels, prompts, scales, classify, reader, clip = None, None, [1.0], None, None, None
    if pipeline.text_encoder is not None:
        prompts = _prompts(datamodule, num_samples, options.seed)
        others = prompts[1:] + prompts[:1]  # the prompts are in a seeded random order: a random pairing
        scales = sorted({float(s) for s in cfg.evaluate.guidance_scales or (1.0, options.guidance_scale)})
        notes.insert(0, f"{num_samples} samples of the training images' captions, at guidance "
                        f"{' and '.join(f'{s:g}' for s in scales)}")
        if features == "synthetic":
            reader = metric.quality.feature_net
            results["prompt_adherence_real"] = _real_adherence(reader, datamodule)
        clip = _clip_score(cfg.evaluate.clip_model, notes, device)
        if clip is not None:
            results["clip_score_real"] = _real_clip_score(clip, datamodule, num_samples)
    if class_names is not None:
        num_classes = len(class_names)
        labels = spread_labels(num_samples, num_classes)
        scales = sorted({float(s) for s in cfg.evaluate.guidance_scales or (1.0, options.guidance_scale)})
        notes.insert(0, f"{num_samples} samples, classes evenly ({num_samples // num_classes}-"
                        f"{-(-num_samples // num_classes)} each), at guidance {' and '.join(f'{s:g}' for s in scales)}")
        classify = load_classifier(cfg.evaluate.classifier) if cfg.evaluate.classifier else metric.classify
        results["classes"] = num_classes
    for scale in scales:
        conditional = labels is not None or prompts is not None
        name, at = (f"samples@{scale:g}", f" @ guidance {scale:g}") if conditional else ("samples", "")
        generator = torch.Generator().manual_seed(options.seed)  # the same noise at every scale
        told, adhered, shuffled = [], [], []
        for start in tqdm(range(0, num_samples, options.batch_size), desc="samples", unit="batch"):
            count = min(options.batch_size, num_samples - start)
            batch = None if labels is None else labels[start : start + count]
            texts = None if prompts is None else prompts[start : start + count]
            images = generate(pipeline, options, count, height, width, generator, batch_size=count,
                              class_labels=None if batch is None else batch.tolist(), guidance_scale=scale,
                              prompts=texts).clamp(-1, 1)
            metric.add(images, name, batch)
            if classify is not None:
                told.append(correct(classify, images, batch, len(class_names)))
            if reader is not None:  # against its own prompt, and against the next sample's (the chance level)
                adhered.append(fact_matches(reader, images, texts))
                shuffled.append(adheres(reader, images, others[start : start + count]))
            if clip is not None:
                clip.update(as_clip_images(images), texts)
        figures = metric.compute(name)
        results.update({f"{key}{at}": value for key, value in figures.items() if "images" not in key})
        results.update({key: value for key, value in figures.items() if "images" in key})
        for label, per_class in metric.compute_per_class(name).items():
            results[f"fid of {class_names[label]}{at}"] = per_class["fid"]
            results[f"floor_fid of {class_names[label]}{at}"] = per_class["floor_fid"]
        if told:
            results[f"class_accuracy{at}"] = float(torch.cat(told).float().mean())
        if adhered:
            matches = torch.cat(adhered)
            results[f"prompt_adherence{at}"] = float(matches.all(dim=1).float().mean())
            results.update({f"prompt_adherence_{fact}{at}": float(share)
                            for fact, share in zip(CHOICES, matches.float().mean(dim=0), strict=True)})
            results[f"prompt_adherence_shuffled{at}"] = float(torch.cat(shuffled).float().mean())
        if clip is not None:
            results[f"clip_score{at}"] = float(clip.compute())
            clip.reset()
        log.info("%s%s", f"guidance {scale:g}: " if at else "", _describe_scale(results, at))
    if class_names is not None and isinstance(metric, FloorSamples):
        per_class = sum(k.startswith("fid of ") for k in results) // len(scales)
        notes.append(f"per-class FID only where a class has at least {metric.quality.min_class_samples} samples and "
                     f"held-out images (twice the embedding's dimension): {per_class} of {len(class_names)} classes")
    if class_names is not None and classify is None:
        notes.append("no class accuracy: on other data than the synthetic set, give evaluate.classifier=<a classifier "
                     "of the same classes saved whole with torch.save>")
    return results, notes, datamodule.source.name


def _describe_scale(results: dict, at: str) -> str:
    """One set's figures as a sentence: class accuracy, FID (against its floor), precision and recall (and the
    floor's)."""
    parts = []
    if f"prompt_adherence{at}" in results:
        parts.append(f"prompt adherence {results[f'prompt_adherence{at}']:.1%} (shuffled prompts "
                     f"{results[f'prompt_adherence_shuffled{at}']:.1%}, real images "
                     f"{results['prompt_adherence_real']:.1%}; by fact: "
                     + ", ".join(f"{fact} {results[f'prompt_adherence_{fact}{at}']:.0%}" for fact in CHOICES) + ")")
    if f"clip_score{at}" in results:
        parts.append(f"CLIP score {results[f'clip_score{at}']:.2f} (real images {results['clip_score_real']:.2f})")
    if f"class_accuracy{at}" in results:
        parts.append(f"class accuracy {results[f'class_accuracy{at}']:.1%}")
    fid, floor = results[f"fid{at}"], results.get(f"floor_fid{at}")
    against = "a data-vs-data floor" if not at else "a floor"
    parts.append(f"sample FID {fid:.2f}" + (f" against {against} of {floor:.2f} ({fid / floor:.1f}x)" if floor else ""))
    if f"precision{at}" in results:
        floors = (f" (floor: {results[f'floor_precision{at}']:.2f}, {results[f'floor_recall{at}']:.2f})"
                  if not at else "")
        parts.append(f"precision {results[f'precision{at}']:.2f}, recall {results[f'recall{at}']:.2f}{floors}")
    return "; ".join(parts)


def _prompts(datamodule, count: int, seed: int) -> list[str]:
    """``count`` prompts: the training images' first captions in a seeded order, over again if there are fewer."""
    if not datamodule.captioned:
        raise ConfigError(f"evaluate.model draws from prompts, and {datamodule.source.name} has no captions: "
                          f"evaluate it on the captioned data it was trained on")
    training = np.flatnonzero(~datamodule.is_val)
    order = training[np.random.default_rng(seed).permutation(len(training))]
    return [datamodule.index.captions[order[i % len(order)]][0] for i in range(count)]


def _clip_score(clip_model: str | None, notes: list[str], device: torch.device) -> CLIPScore | None:
    """The CLIP score metric of ``evaluate.clip_model``, or None (off, or its weights missing: said in ``notes``)."""
    if not clip_model:
        return None
    try:
        return load_clip_score(clip_model).to(device)
    except MissingWeightsError as error:
        notes.append(str(error))
        return None


def _real_clip_score(clip: CLIPScore, datamodule, count: int) -> float:
    """The CLIP score of the first ``count`` training images with their own captions: what real data reaches."""
    seen = 0
    for batch in datamodule.reference_dataloader():
        take = min(len(batch["pixel_values"]), count - seen)
        clip.update(as_clip_images(batch["pixel_values"][:take]), list(batch["captions"])[:take])
        seen += take
        if seen >= count:
            break
    score = float(clip.compute())
    clip.reset()
    return score


def _real_adherence(reader, datamodule) -> float:
    """The share of real training images whose facts the reader reads as their own caption states: the ceiling."""
    agree = [adheres(reader, batch["pixel_values"], list(batch["captions"]))
             for batch in datamodule.reference_dataloader()]
    return float(torch.cat(agree).float().mean())
