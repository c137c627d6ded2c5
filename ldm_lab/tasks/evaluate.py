"""task=evaluate: an autoencoder (PSNR, SSIM, LPIPS, rFID on a data split) or a latent diffusion model
(FID of N samples against the training images; a class-conditional model's samples spread evenly over its
classes, a text-conditional model's drawn from the training captions, at guidance 1 and at
``sample.guidance_scale``, with their class accuracy or, on the captioned synthetic data, their prompt
adherence, and a text model's CLIP score where a pretrained CLIP is at hand), from a checkpoint or an exported
folder.

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
from omegaconf import DictConfig

from ldm_lab.core.errors import ConfigError
from ldm_lab.evaluation.metrics import ReconstructionMetrics
from ldm_lab.evaluation.offline import evaluate_reconstructions
from ldm_lab.io.model_sources import (
    AUTOENCODER,
    LATENT_DIFFUSION,
    Source,
    load_first_stage,
    load_latent_diffusion,
    resolve,
)
from ldm_lab.tasks.sample_metrics import FEATURES, evaluation_datamodule, measure_samples, reference_path

log = logging.getLogger(__name__)


def evaluate_autoencoder(cfg: DictConfig, source: Source, device: torch.device) -> tuple[dict, list[str], str]:
    """PSNR, SSIM, LPIPS and rFID of the autoencoder's reconstructions of the validation images."""
    autoencoder = load_first_stage(source, source.key).to(device)
    datamodule = evaluation_datamodule(cfg, autoencoder.downsample_factor)
    # The validation stack decides what it can measure offline (weights present) and says what it cannot.
    available = ReconstructionMetrics(lpips=cfg.evaluate.lpips, rfid=cfg.evaluate.rfid, switches="evaluate",
                                      vgg16_weights=cfg.paths.weights.vgg16,
                                      inception_weights=cfg.paths.weights.inception)
    reference = None
    if available.fid is not None:
        reference = reference_path(cfg, datamodule, "val", int(datamodule.is_val.sum()))
    results = evaluate_reconstructions(autoencoder.reconstruct, datamodule.val_dataloader(), device, available.lpips_model,
                                       available.fid, reference)
    notes = list(available.notes)
    results.update(resolution=datamodule.resolution)
    return results, notes, datamodule.source.name


def evaluate_diffusion(cfg: DictConfig, source: Source, device: torch.device) -> tuple[dict, list[str], str]:
    """:func:`~ldm_lab.tasks.sample_metrics.measure_samples` of the latent diffusion model ``source`` holds."""
    return measure_samples(cfg, load_latent_diffusion(source, source.key).to(device), device)


EVALUATIONS = {AUTOENCODER: evaluate_autoencoder, LATENT_DIFFUSION: evaluate_diffusion}


def run(cfg: DictConfig) -> dict[str, float]:
    if cfg.evaluate.model is None:
        raise ConfigError("task=evaluate needs evaluate.model=<a .ckpt, an exported diffusers folder or an original "
                          "checkpoint>")
    if cfg.evaluate.features not in FEATURES:
        raise ConfigError(f"evaluate.features={cfg.evaluate.features}: choose one of {', '.join(FEATURES)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    source = resolve(cfg.evaluate.model, "evaluate.model", (AUTOENCODER, LATENT_DIFFUSION))
    results, notes, data_name = EVALUATIONS[source.holds](cfg, source, device)
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
