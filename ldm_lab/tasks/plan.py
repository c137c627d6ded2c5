"""task=plan: will this config's training step fit the card? Before launching, on the CPU.

    python run.py task=plan experiment=sd_vae_4060ti
    python run.py task=plan experiment=celebahq_ldm_vq4 plan.budget_gb=8

Weights, EMA, optimizer states and gradients are counted from the built stage (fp32 master weights,
as bf16-mixed keeps them). Activations are traced: a real second training step runs on the CPU at
the config's precision and micro-batch size, at smaller square sides (``plan.trace_sides``, default a
quarter and a half of the target), and the allocator peak above what the stage holds is extrapolated
linearly in pixels to the target (the largest bucket, or ``data.resolution``). CUDA adds its context
and allocator slack (``plan.cuda_overhead_gb``), which no CPU trace can see.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from ldm_lab.stages.build import build_stage
from ldm_lab.tasks import model_config
from ldm_lab.tasks.memory import GIB, trace_step

log = logging.getLogger(__name__)
CONF = Path(__file__).resolve().parents[2] / "conf"


def planning_config(cfg: DictConfig) -> DictConfig:
    """The model config made buildable offline without changing its memory (:func:`model_config.for_planning`);
    a first stage it lacks is a random one of the ``plan.first_stage`` architecture."""
    model = OmegaConf.create(OmegaConf.to_container(cfg.model, resolve=True))
    return model_config.for_planning(model, lambda: random_first_stage(cfg.plan.first_stage))


def random_first_stage(name: str) -> dict:
    """The description (class and config) of conf/model/<name>.yaml's network, randomly initialised."""
    vae = _compose_model(name).vae
    config = {k: v for k, v in OmegaConf.to_container(vae).items() if not k.startswith("_")}
    log.info("model.first_stage is unset: planning with a randomly initialised model/%s first stage", name)
    return {"class_name": vae._target_.split(".")[-1], "config": config}


def _compose_model(name: str) -> DictConfig:
    """``conf/model/<name>.yaml`` as composed (its defaults applied)."""
    overrides = [f"model={name}"]
    if GlobalHydra.instance().is_initialized():  # inside run.py
        return compose(config_name="config", overrides=overrides).model
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides).model


def target_side(cfg: DictConfig) -> int:
    """The side of a square with the pixels of the largest training image: the largest bucket's area."""
    buckets = cfg.data.get("buckets")
    return int(math.sqrt(buckets.max_area)) if buckets else int(cfg.data.resolution)


def build_for_planning(cfg: DictConfig):
    torch.manual_seed(0)
    return build_stage(planning_config(cfg), cfg.disc, cfg.speed)


def measure(cfg: DictConfig, side: int, stage=None) -> dict[str, int]:
    """Trace a step of a fresh stage (or ``stage``, untrained) at ``side`` px: held bytes by kind and the step's peak."""
    stage = stage if stage is not None else build_for_planning(cfg)
    held, peak = trace_step(stage, lambda: stage.planning_batch(cfg.data.batch_size, side), cfg.trainer.precision)
    return {"weights": held.weights, "ema": held.ema, "optimizer": held.optimizer, "gradients": held.gradients,
            "peak": peak}


def plan(cfg: DictConfig) -> dict:
    """The step's memory by kind (bytes), the traces it was extrapolated from, and whether it fits."""
    target = target_side(cfg)
    first = build_for_planning(cfg)  # its downsampling factor sets the sides; it then traces the first one
    factor = first.downsample_factor
    sides = cfg.plan.trace_sides or [target // 4, target // 2]
    sides = sorted({max(factor, 32, side // factor * factor) for side in sides})  # a PatchGAN needs 32 px
    points = [measure(cfg, sides[0], first)] + [measure(cfg, side) for side in sides[1:]]
    activations = [p["peak"] - p["gradients"] for p in points]
    pixels = [side * side for side in sides]
    if len(points) > 1:
        slope, intercept = np.polyfit(pixels, activations, 1)
        predicted = int(intercept + slope * target * target)
    else:
        predicted = int(activations[0] * target * target / pixels[0])
    held = points[-1]
    parts = {"weights": held["weights"], "EMA": held["ema"], "optimizer states": held["optimizer"],
             "gradients": held["gradients"], "activations and workspace": predicted}
    total = sum(parts.values())
    overhead = int(cfg.plan.cuda_overhead_gb * GIB)
    budget = int(cfg.plan.budget_gb * GIB)
    result = {"parts": parts, "total": total, "cuda_overhead": overhead, "budget": budget,
              "fits": total + overhead <= budget, "target_side": target, "batch_size": cfg.data.batch_size,
              "precision": cfg.trainer.precision, "traces": dict(zip(sides, activations, strict=True))}
    _report(cfg, result)
    return result


def _report(cfg: DictConfig, result: dict) -> None:
    gib = lambda n: f"{n / GIB:.2f}"  # noqa: E731
    lines = [f"# Memory plan: {cfg.model._target_.split('.')[-1]}, {result['target_side']} px, micro-batch "
             f"{result['batch_size']}, {result['precision']}", "", "| part | GiB |", "|---|---:|"]
    lines += [f"| {name} | {gib(value)} |" for name, value in result["parts"].items()]
    lines += [f"| **total (traced)** | **{gib(result['total'])}** |",
              f"| CUDA context and allocator slack (plan.cuda_overhead_gb) | {gib(result['cuda_overhead'])} |",
              f"| **total on a GPU** | **{gib(result['total'] + result['cuda_overhead'])}** |",
              f"| budget (plan.budget_gb) | {gib(result['budget'])} |", "",
              f"**{'Fits' if result['fits'] else 'Does not fit'}** the budget.", "",
              "Activations and workspace traced on the CPU at " + ", ".join(
                  f"{side} px: {gib(value)} GiB" for side, value in result["traces"].items())
              + f"; extrapolated linearly in pixels to {result['target_side']} px."]
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.md").write_text("\n".join(lines) + "\n")
    log.info("\n%s\nwritten: %s", "\n".join(lines), out / "plan.md")


def run(cfg: DictConfig) -> dict:
    return plan(cfg)
