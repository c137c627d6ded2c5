"""The text-to-image presets for an 8 GB card, measured on the CPU: task=plan's memory of a training step and the
FLOPs a training image and a guided sample cost (counted by torch's FlopCounterMode on the planned stage).

    python experiments/t2i_presets/measure.py

Writes experiments/t2i_presets/results.md.
"""

from __future__ import annotations

from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from torch.utils.flop_counter import FlopCounterMode

from ldm_lab.config.schema import register_configs
from ldm_lab.diffusion.pipeline import predict
from ldm_lab.tasks.memory import GIB
from ldm_lab.tasks.plan import build_for_planning, plan, target_side

ROOT = Path(__file__).resolve().parents[2]
PRESETS = ("t2i_4060ti", "t2i_dit_4060ti")
SAMPLING_STEPS = 50  # DDIM-50 with classifier-free guidance: two predictions a step


def flops_per_image(cfg) -> dict[str, float]:
    """GFLOPs of one training image (the denoiser's forward and backward on cached latents and caption embeddings)
    and of one sampled image (its forward, twice a step for guidance, SAMPLING_STEPS steps)."""
    stage = build_for_planning(cfg).train()
    batch = stage.planning_batch(1, target_side(cfg))
    generator = torch.Generator().manual_seed(0)
    latents = stage.latents(batch, generator)
    condition = stage.condition(batch, generator, stage.text_encoder)
    with FlopCounterMode(display=False) as training:
        stage.loss(stage.denoiser, latents, generator, training=True, **condition).backward()
    with torch.no_grad(), FlopCounterMode(display=False) as forward:
        predict(stage.denoiser, latents, 500, **condition)
    parameters = sum(p.numel() for p in stage.denoiser.parameters())
    return {"parameters": parameters / 1e6, "train": training.get_total_flops() / 1e9,
            "sample": 2 * SAMPLING_STEPS * forward.get_total_flops() / 1e9}


def main() -> None:
    register_configs()
    rows = ["| preset | denoiser | parameters (M) | micro-batch x accumulation | plan: GiB on a GPU (of 8) | "
            "GFLOPs a training image | GFLOPs a sample (DDIM-50, guided) |", "|---|---|---:|---|---:|---:|---:|"]
    for preset in PRESETS:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=[f"experiment={preset}", "task=plan",
                                               f"paths.output_dir=/tmp/ldm_lab_t2i_presets/{preset}"])
        memory = plan(cfg)
        flops = flops_per_image(cfg)
        rows.append(f"| {preset} | {cfg.model.denoiser._target_.split('.')[-1]} | {flops['parameters']:.1f} | "
                    f"{cfg.data.batch_size} x {cfg.model.accumulate_grad_batches} | "
                    f"{(memory['total'] + memory['cuda_overhead']) / GIB:.2f} | {flops['train']:.0f} | "
                    f"{flops['sample']:.0f} |")
        print(rows[-1], flush=True)
    out = ROOT / "experiments" / "t2i_presets" / "results.md"
    out.write_text("\n".join(["# Text-to-image presets (CPU: plan and FLOP counts)", "", *rows, ""]))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
