"""task=evaluate: an autoencoder checkpoint or exported folder, measured on a data split.

    python run.py task=evaluate evaluate.model=outputs/.../export data=imagenet100 data.resolution=256

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

from ldm_lab.evaluation import evaluate_reconstructions, make_fid
from ldm_lab.losses.perceptual import LPIPS
from ldm_lab.tasks.build import build_datamodule, load_stage
from ldm_lab.weights import MissingWeightsError, find_weights, missing_message

log = logging.getLogger(__name__)


def load_autoencoder(path: Path):
    """(reconstruct function, downsample factor, the module to move to the device) for a Lightning
    checkpoint or a diffusers folder."""
    if path.is_file():
        stage = load_stage(path)
        return stage.eval().reconstruct, stage.downsample_factor, stage.eval_vae
    config = json.loads((path / "config.json").read_text())
    model = {"AutoencoderKL": AutoencoderKL, "VQModel": VQModel}[config["_class_name"]].from_pretrained(path).eval()

    def reconstruct(inputs: torch.Tensor) -> torch.Tensor:
        if isinstance(model, AutoencoderKL):
            return model.decode(model.encode(inputs).latent_dist.mode()).sample
        return model.decode(model.encode(inputs).latents).sample  # decode quantizes

    return reconstruct, 2 ** (len(model.config.block_out_channels) - 1), model


def run(cfg: DictConfig) -> dict[str, float]:
    if cfg.evaluate.model is None:
        raise ValueError("task=evaluate needs evaluate.model=<a .ckpt or an exported diffusers folder>")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reconstruct, factor, model = load_autoencoder(Path(cfg.evaluate.model))
    model.to(device)
    datamodule = build_datamodule(cfg, factor)
    datamodule.prepare_data()
    datamodule.setup("validate")
    notes = []
    lpips = None
    if cfg.evaluate.lpips:
        try:
            lpips = LPIPS("pretrained", cfg.paths.weights.vgg16)
        except MissingWeightsError as error:
            notes.append(f"LPIPS skipped: {error}")
    fid, reference = None, None
    if cfg.evaluate.rfid:
        weights = find_weights("inception", cfg.paths.weights.inception)
        if weights is None:
            notes.append(f"rFID skipped: {missing_message('inception', cfg.paths.weights.inception)}")
        else:
            fid = make_fid(2048, str(weights)).to(device)
            name = "".join(c if c.isalnum() else "_" for c in datamodule.source.name)
            reference = (Path(cfg.evaluate.reference_dir) /
                         f"{name}-val{int(datamodule.is_val.sum())}-{datamodule.resolution}px-inception2048.npz")
    results = evaluate_reconstructions(reconstruct, datamodule.val_dataloader(), device, lpips, fid, reference)
    results.update(model=str(cfg.evaluate.model), data=datamodule.source.name, resolution=datamodule.resolution)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps({**results, "notes": notes}, indent=2))
    rows = [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in results.items()]
    (out / "evaluation.md").write_text("| metric | value |\n|---|---|\n" + "\n".join(rows) + "\n"
                                       + "".join(f"\n{note}\n" for note in notes))
    for note in notes:
        log.warning(note)
    log.info("evaluation of %s on %s:\n%s", cfg.evaluate.model, datamodule.source.name, "\n".join(rows))
    log.info("written: %s, %s", out / "evaluation.json", out / "evaluation.md")
    return results
