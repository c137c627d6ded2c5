"""task=ema_sweep: the post-hoc EMA's width chosen by the sample metric (EDM2, Karras et al. 2024, section 3).

    python run.py experiment=quickstart_ldm task=ema_sweep ema_sweep.run=outputs/<date>/<time> evaluate.num_samples=256

For a run trained with ``model.posthoc_ema.sigma_rels``: each width of ``ema_sweep.sigma_rels`` is reconstructed from
the run's snapshots (ldm_lab/io/ema_snapshots.py) at the last snapshot's step (or ``ema_sweep.step``), takes the
place of the checkpoint's evaluation EMA, and its samples are measured as task=evaluate measures them: at guidance 1
and, for a conditional model, at ``sample.guidance_scale`` (EDM2-S's best width was 0.130 unguided, 0.025 guided).
Writes ema_sweep.md, ema_sweep.json and ema_sweep.png, and exports the width that scores best at the guidance the
model samples with into export/.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import matplotlib
import torch
from omegaconf import DictConfig

from ldm_lab.core.errors import ConfigError, MissingPathError
from ldm_lab.diffusion.sampling import SamplingOptions
from ldm_lab.io.ema_snapshots import FOLDER, reconstruct, snapshot_steps, tracked_widths
from ldm_lab.io.export import export_pipeline
from ldm_lab.io.model_sources import load_latent_diffusion
from ldm_lab.tasks.sample_metrics import measure_samples

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

log = logging.getLogger(__name__)


def _scores(results: dict) -> dict[str, float]:
    """The sample FIDs of one evaluation by guidance ("fid", or "fid @ guidance <scale>"), over their floor where
    the embedding has one."""
    return {key: value / results[f"floor_{key}"] if f"floor_{key}" in results else value
            for key, value in results.items() if key == "fid" or key.startswith("fid @ guidance")}


def _column(key: str) -> str:
    return key.replace("fid @ ", "") if "@" in key else "unguided"


def _load(pipeline, weights: dict[str, dict[str, torch.Tensor]]) -> None:
    pipeline.unet.load_state_dict(weights["denoiser"])
    if "text_encoder" in weights:  # a text encoder trained with the denoiser, under the same EMAs
        pipeline.text_encoder.load_state_dict(weights["text_encoder"])


def _plot(rows: list[dict], trained: list[float], chosen: float, path: Path, unit: str) -> None:
    figure, axes = plt.subplots(figsize=(6, 4))
    for key in _scores(rows[0]):
        axes.plot([row["sigma_rel"] for row in rows], [_scores(row)[key] for row in rows], "o-",
                  label=_column(key))
    for width in trained:
        axes.axvline(width, color="grey", linestyle=":", linewidth=1)
    axes.axvline(chosen, color="black", linestyle="--", linewidth=1, label=f"chosen {chosen:g}")
    axes.set_xscale("log")
    axes.set_xlabel("EMA width sigma_rel (dotted: tracked in training)")
    axes.set_ylabel(unit)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run(cfg: DictConfig) -> dict:
    options = cfg.ema_sweep
    if options.run is None:
        raise ConfigError("task=ema_sweep needs ema_sweep.run=<a training run folder>, trained with "
                          "model.posthoc_ema.sigma_rels=[...]")
    run_dir = Path(options.run)
    checkpoint, folder = run_dir / "checkpoints" / "last.ckpt", run_dir / FOLDER
    if not checkpoint.is_file():
        raise MissingPathError(f"ema_sweep.run={run_dir} has no checkpoints/last.ckpt: give the folder of a "
                               f"training run (its hydra.run.dir)")
    steps = snapshot_steps(folder)
    if not steps:
        raise MissingPathError(f"ema_sweep.run={run_dir} has no EMA snapshots in {FOLDER}/: train it with "
                               f"model.posthoc_ema.sigma_rels=[0.05,0.10] model.ema_decay=null")
    step = steps[-1] if options.step is None else int(options.step)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipeline = load_latent_diffusion(checkpoint, "ema_sweep.run").to(device)
    conditional = pipeline.text_encoder is not None or bool(pipeline.config.class_names)
    scale = SamplingOptions.from_config(cfg.sample).guidance_scale
    key = f"fid @ guidance {scale:g}" if conditional else "fid"
    scales = cfg.evaluate.guidance_scales
    if conditional and scales and scale not in [float(s) for s in scales]:
        raise ConfigError(f"task=ema_sweep chooses at the guidance the model samples with, sample.guidance_scale="
                          f"{scale:g}: add it to evaluate.guidance_scales={list(scales)}")
    rows, notes = [], []
    for sigma_rel in sorted(float(s) for s in options.sigma_rels):
        _load(pipeline, reconstruct(folder, sigma_rel, step))
        results, notes, _ = measure_samples(cfg, pipeline, device)
        rows.append({"sigma_rel": sigma_rel, **results})
        log.info("sigma_rel %g: %s", sigma_rel, ", ".join(f"{k} {v:.3f}" for k, v in _scores(results).items()))
    best = min(rows, key=lambda row: _scores(row)[key])
    trained = tracked_widths(folder, max(s for s in steps if s <= step))
    _load(pipeline, reconstruct(folder, best["sigma_rel"], step))

    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    unit = "FID / floor" if any(k.startswith("floor_fid") for k in rows[0]) else "FID"
    keys = list(_scores(rows[0]))
    lines = [f"# Post-hoc EMA sweep of {run_dir}, step {step}", "",
             f"{unit} of {cfg.evaluate.num_samples} samples per width; tracked in training: "
             f"{', '.join(f'{w:g}' for w in trained)}; chosen ({_column(key)}):"
             f" **{best['sigma_rel']:g}**", "",
             "| sigma_rel | " + " | ".join(map(_column, keys)) + " |", "|---:|" + "---:|" * len(keys)]
    lines += [f"| {row['sigma_rel']:g} | " + " | ".join(f"{_scores(row)[k]:.3f}" for k in keys) + " |" for row in rows]
    lines += ["", *notes]
    (out / "ema_sweep.md").write_text("\n".join(lines) + "\n")
    (out / "ema_sweep.json").write_text(json.dumps({"run": str(run_dir), "step": step, "chosen": best["sigma_rel"],
                                                    "chosen_at": key, "rows": rows, "notes": notes}, indent=2))
    _plot(rows, trained, best["sigma_rel"], out / "ema_sweep.png", unit)
    exported = export_pipeline(pipeline, out / "export")
    log.info("\n%s", "\n".join(lines))
    log.info("written: %s, %s, %s; the EMA of width %g exported to %s", out / "ema_sweep.md", out / "ema_sweep.json",
             out / "ema_sweep.png", best["sigma_rel"], exported)
    return {"chosen": best["sigma_rel"], "rows": rows}

