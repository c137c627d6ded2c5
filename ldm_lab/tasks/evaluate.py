"""task=evaluate: an autoencoder (PSNR, SSIM, LPIPS, rFID on a data split) or a latent diffusion model
(FID of N samples against the training images), from a checkpoint or an exported folder.

    python run.py task=evaluate evaluate.model=outputs/.../export data=imagenet100 data.resolution=256
    python run.py task=evaluate evaluate.model=outputs/.../checkpoints/best.ckpt data=celebahq evaluate.num_samples=50000
    python run.py task=evaluate evaluate.model=celebahq-ldm-vq-4/model.ckpt data=celebahq   # the original code's

Images are resized on the short side and center-cropped (the datamodule's validation images: the
held-out ones, or the data set's own split with ``data.val_source``). Writes evaluation.json and
evaluation.md to the run folder. Metrics whose weights are missing are skipped with the reason;
the others are still reported.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from diffusers import AutoencoderKL, VQModel
from omegaconf import DictConfig

from ldm_lab.config.validate import ConfigError
from ldm_lab.data.synthetic import SyntheticSource
from ldm_lab.diffusion.samples import load_sampler_parts
from ldm_lab.diffusion.sampling import generate_images
from ldm_lab.evaluation.metrics import ReconstructionMetrics, SampleQuality, make_fid
from ldm_lab.evaluation.offline import (
    evaluate_reconstructions,
    evaluate_samples,
    evaluate_samples_against_floor,
)
from ldm_lab.evaluation.synthetic_features import load_feature_net
from ldm_lab.io.checkpoints import read_checkpoint
from ldm_lab.io.convert import converted, is_original
from ldm_lab.io.weights import MissingWeightsError, find_weights, missing_message
from ldm_lab.nn.downsampling import downsampling
from ldm_lab.stages.build import load_stage
from ldm_lab.tasks.build import build_datamodule

FEATURES = ("auto", "inception", "synthetic")  # evaluate.features: the embedding of an LDM's sample FID
AUTOENCODERS = {"AutoencoderKL": AutoencoderKL, "VQModel": VQModel}

log = logging.getLogger(__name__)


def load_autoencoder(path: Path):
    """(reconstruct function, downsample factor, the module to move to the device) for a Lightning
    checkpoint or a diffusers folder."""
    if path.is_file():
        stage = load_stage(path)
        return stage.eval().reconstruct, stage.downsample_factor, stage.eval_vae
    held = json.loads((path / "config.json").read_text())["_class_name"]
    if held not in AUTOENCODERS:
        raise ConfigError(f"evaluate.model={path} holds a {held}: task=evaluate measures an autoencoder "
                          f"({' or '.join(AUTOENCODERS)}) or a whole latent diffusion model")
    model = AUTOENCODERS[held].from_pretrained(path).eval()

    def reconstruct(inputs: torch.Tensor) -> torch.Tensor:
        if isinstance(model, AutoencoderKL):
            return model.decode(model.encode(inputs).latent_dist.mode()).sample
        return model.decode(model.encode(inputs).latents).sample  # decode quantizes

    return reconstruct, downsampling(model.config), model


def _datamodule(cfg: DictConfig, downsample_factor: int):
    datamodule = build_datamodule(cfg, downsample_factor)
    datamodule.prepare_data()
    datamodule.setup("validate")
    return datamodule


def _reference_path(cfg: DictConfig, datamodule, split: str, count: int) -> Path:
    name = "".join(c if c.isalnum() else "_" for c in datamodule.source.name)
    return Path(cfg.evaluate.reference_dir) / f"{name}-{split}{count}-{datamodule.resolution}px-inception2048.npz"


def _model_path(model: str) -> Path:
    """evaluate.model as a lab checkpoint or a diffusers folder: an original checkpoint (LDM's, taming's, SD's
    VAE) is converted once and cached (ldm_lab/io/convert.py)."""
    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(f"evaluate.model={model}: no such file or folder")
    return converted(path) if path.is_file() and is_original(path) else path


def _is_diffusion_model(path: Path) -> bool:
    if path.is_dir():
        return (path / "model_index.json").is_file()
    return "first_stage" in read_checkpoint(path, mmap=True)["ldm_lab"]


def evaluate_autoencoder(cfg: DictConfig, model_path: Path, device: torch.device) -> tuple[dict, list[str], str]:
    reconstruct, factor, model = load_autoencoder(model_path)
    model.to(device)
    datamodule = _datamodule(cfg, factor)
    # The validation stack decides what it can measure offline (weights present) and says what it cannot.
    available = ReconstructionMetrics(lpips=cfg.evaluate.lpips, rfid=cfg.evaluate.rfid,
                                      vgg16_weights=cfg.paths.weights.vgg16,
                                      inception_weights=cfg.paths.weights.inception)
    reference = None
    if available.fid is not None:
        reference = _reference_path(cfg, datamodule, "val", int(datamodule.is_val.sum()))
    results = evaluate_reconstructions(reconstruct, datamodule.val_dataloader(), device, available.lpips_model,
                                       available.fid, reference)
    notes = list(available.notes)
    results.update(resolution=datamodule.resolution)
    return results, notes, datamodule.source.name


def _features(cfg: DictConfig, datamodule) -> tuple[str, Path | None]:
    """Which embedding measures samples: Inception when its weights are present, else on the embedded
    synthetic data the lab's own feature network (evaluate.features=auto); and Inception's weights."""
    weights = find_weights("inception", cfg.paths.weights.inception)
    synthetic = isinstance(datamodule.source, SyntheticSource)
    features = cfg.evaluate.features
    if features == "auto":
        features = "inception" if weights is not None or not synthetic else "synthetic"
    if features == "inception" and weights is None:  # FID is the only metric of a generative model here
        raise MissingWeightsError(missing_message("inception", cfg.paths.weights.inception))
    if features == "synthetic" and not synthetic:
        raise ConfigError(f"evaluate.features=synthetic: its feature network reads the embedded synthetic data's "
                          f"drawings, and {datamodule.source.name} is not that data; use evaluate.features=inception")
    return features, weights


def evaluate_diffusion(cfg: DictConfig, model_path: Path, device: torch.device) -> tuple[dict, list[str], str]:
    """FID of ``evaluate.num_samples`` samples (drawn as ``sample.*`` says) against the training images."""
    unet, first_stage, latent_scale, noise_scheduler = load_sampler_parts(model_path)
    unet.to(device)
    first_stage.to(device)
    datamodule = _datamodule(cfg, first_stage.downsample_factor * downsampling(unet.config))
    features, weights = _features(cfg, datamodule)
    options = cfg.sample
    height, width = options.height or datamodule.resolution, options.width or datamodule.resolution
    generator = torch.Generator().manual_seed(options.seed)

    def generate(n: int) -> torch.Tensor:
        return generate_images(unet, first_stage, latent_scale, noise_scheduler, n, height, width, options.sampler,
                               options.num_inference_steps, options.eta, n, generator)

    notes = []
    if features == "inception":
        fid = make_fid(2048, str(weights)).to(device)
        reference = _reference_path(cfg, datamodule, "train", int((~datamodule.is_val).sum()))
        results = evaluate_samples(generate, cfg.evaluate.num_samples, options.batch_size,
                                   datamodule.reference_dataloader(), fid, reference)
    else:
        feature_net, described = load_feature_net(cfg.evaluate.reference_dir, datamodule.resolution)
        results = evaluate_samples_against_floor(generate, cfg.evaluate.num_samples, options.batch_size,
                                                 datamodule.reference_dataloader(), SampleQuality(feature_net))
        notes.append(f"features: {described}, not Inception: these figures compare only with each other. "
                     f"floor_*: held-out real images in the samples' place")
        log.info("sample FID %.2f against a data-vs-data floor of %.2f (%.1fx); precision %.2f, recall %.2f "
                 "(floor: %.2f, %.2f)", results["fid"], results["floor_fid"], results["fid"] / results["floor_fid"],
                 results["precision"], results["recall"], results["floor_precision"], results["floor_recall"])
    results.update(features=features, resolution=f"{width}x{height}", sampler=options.sampler,
                   steps=options.num_inference_steps)
    return results, notes, datamodule.source.name


def run(cfg: DictConfig) -> dict[str, float]:
    if cfg.evaluate.model is None:
        raise ValueError("task=evaluate needs evaluate.model=<a .ckpt, an exported diffusers folder or an original "
                         "checkpoint>")
    if cfg.evaluate.features not in FEATURES:
        raise ConfigError(f"evaluate.features={cfg.evaluate.features}: choose one of {', '.join(FEATURES)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_path = _model_path(cfg.evaluate.model)
    evaluate = evaluate_diffusion if _is_diffusion_model(model_path) else evaluate_autoencoder
    results, notes, data_name = evaluate(cfg, model_path, device)
    results.update(model=str(cfg.evaluate.model), data=data_name)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps({**results, "notes": notes}, indent=2))
    rows = [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in results.items()]
    (out / "evaluation.md").write_text("| metric | value |\n|---|---|\n" + "\n".join(rows) + "\n"
                                       + "".join(f"\n{note}\n" for note in notes))
    for note in notes:
        log.warning(note)
    log.info("evaluation of %s on %s:\n%s", cfg.evaluate.model, data_name, "\n".join(rows))
    log.info("written: %s, %s", out / "evaluation.json", out / "evaluation.md")
    return results
