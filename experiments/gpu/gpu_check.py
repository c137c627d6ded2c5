"""make gpu-check: what the lab's CPU machines cannot measure, on a CUDA machine.

    make gpu-check        (or: python experiments/gpu/gpu_check.py [--steps N] [--no-compile])

1. Memory: task=plan's prediction (traced on the CPU) against torch.cuda.max_memory_allocated() of real
   training steps, for experiment=sd_vae_4060ti and experiment=celebahq_ldm_vq4 (the goal: within 10%).
2. Speed of each stage at its real size: images/s, and the fraction of this GPU's bf16 peak (a measured
   8192^3 bf16 matmul) that a step achieves (FLOPs from torch.utils.flop_counter).
3. Each speed option (conf/speed) off and on: channels_last, torch.compile, fused AdamW, SDPA attention.
4. With two or more GPUs, a 2-process DDP run against a 1-GPU run of the same job.

Writes experiments/gpu/<device>.md. Without CUDA it says so and exits 0: nothing to measure.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

NO_CUDA = ("make gpu-check measures GPU memory and speed and needs a CUDA device; this machine has none "
           "(torch.cuda.is_available() is False). Nothing was measured: run it on a GPU machine.")
GIB = 1024**3
# (label, composition, side, cached latents): each stage at its preset's real size.
STAGES = [("KL SD f8c4 + PatchGAN (sd_vae_4060ti)", ["experiment=sd_vae_4060ti"], 256, False),
          ("VQ f4 + PatchGAN (celebahq_vqvae_f4)", ["experiment=celebahq_vqvae_f4"], 256, False),
          ("LDM-VQ-4 UNet, cached latents (celebahq_ldm_vq4)", ["experiment=celebahq_ldm_vq4"], 256, True)]
OPTIONS = ["channels_last", "compile", "fused_adamw", "sdpa"]


class CudaPeakOfSecondStep(L.Callback):
    """torch.cuda.max_memory_allocated() over the second optimizer step (all its micro-batches)."""

    def __init__(self):
        self.peak: int | None = None
        self._started = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.step == 1 and not self._started:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._started = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.step == 2 and self._started and self.peak is None:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()


def measured_peak(cfg) -> int:
    """The CUDA allocator's peak over a real second training step of the planned stage."""
    from ldm_lab.tasks.plan import build_for_planning, target_side

    stage = build_for_planning(cfg)
    stage.max_steps = 2
    batches = [stage.planning_batch(cfg.data.batch_size, target_side(cfg)) for _ in range(2 * stage.accumulate_grad_batches)]
    peak = CudaPeakOfSecondStep()
    trainer = L.Trainer(accelerator="cuda", devices=1, precision=cfg.trainer.precision, max_epochs=-1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[peak])
    trainer.fit(stage, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    del stage, trainer, batches
    torch.cuda.empty_cache()
    return peak.peak


def bf16_matmul_peak(n: int = 8192, repeats: int = 10) -> float:
    """FLOP/s of an n^3 bf16 matmul: the tensor-core peak this GPU reaches in practice."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def memory_rows(compose_cfg) -> list[str]:
    from ldm_lab.tasks.plan import plan

    rows = ["| config | predicted (task=plan, traced on the CPU) | measured max_memory_allocated | measured / predicted |",
            "|---|---:|---:|---:|"]
    for preset in ("sd_vae_4060ti", "celebahq_ldm_vq4"):
        cfg = compose_cfg(f"experiment={preset}", f"paths.output_dir={tempfile.mkdtemp()}")
        predicted = plan(cfg)["total"]
        measured = measured_peak(cfg)
        rows.append(f"| experiment={preset} | {predicted / GIB:.2f} GiB | {measured / GIB:.2f} GiB | "
                    f"{measured / predicted:.2f} |")
        print(rows[-1], flush=True)
    return rows


def speed_rows(compose_cfg, time_steps, pixels, moments, steps: int, peak: float) -> list[str]:
    rows = ["| stage | side | micro-batch | s/step | images/s | TFLOP/step | of the bf16 matmul peak |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for label, overrides, side, cached in STAGES:
        cfg = compose_cfg(*overrides, "model.accumulate_grad_batches=1")
        batch = cfg.data.batch_size
        result = time_steps(cfg, moments(cfg, batch, side) if cached else pixels(batch, side), steps)
        rows.append(f"| {label} | {side} | {batch} | {result['seconds']:.3f} | {batch / result['seconds']:.1f} | "
                    f"{result['flops'] / 1e12:.2f} | {result['flops'] / result['seconds'] / peak:.0%} |")
        print(rows[-1], flush=True)
    return rows


def option_rows(compose_cfg, time_steps, pixels, moments, steps: int, compile_too: bool) -> list[str]:
    rows = ["| option | stage | off s/step | on s/step | on / off |", "|---|---|---:|---:|---:|"]
    for label, overrides, side, cached in (STAGES[0], STAGES[2]):
        for option in OPTIONS:
            if option == "compile" and not compile_too:
                continue
            seconds = []
            for value in ("false", "true"):
                cfg = compose_cfg(*overrides, "model.accumulate_grad_batches=1", f"speed.{option}={value}")
                batch = cfg.data.batch_size
                make = moments(cfg, batch, side) if cached else pixels(batch, side)
                seconds.append(time_steps(cfg, make, steps)["seconds"])
            rows.append(f"| {option} | {label} | {seconds[0]:.3f} | {seconds[1]:.3f} | {seconds[1] / seconds[0]:.2f} |")
            print(rows[-1], flush=True)
    return rows


def ddp_rows() -> list[str]:
    """The same short job on 1 and on 2 GPUs (DDP), timed end to end."""
    job = ["experiment=sd_vae_4060ti", "max_steps=20", "val_every_n_steps=20", "data.source.min_side=256",
           "data.source.max_side=320", "data.num_workers=4", "require_weights=false", "callbacks.image_logger=null",
           "trainer.strategy=ddp_find_unused_parameters_true"]
    rows = ["| devices | rc | wall s (20 steps, with start-up) |", "|---:|---:|---:|"]
    for devices in (1, 2):
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            result = subprocess.run([sys.executable, str(ROOT / "run.py"), *job, f"trainer.devices={devices}",
                                     f"paths.root_dir={folder}", f"hydra.run.dir={folder}/run"],
                                    cwd=ROOT, capture_output=True, text=True)
            rows.append(f"| {devices} | {result.returncode} | {time.perf_counter() - start:.1f} |")
            if result.returncode:
                rows.append(f"| | stderr | {result.stderr.strip().splitlines()[-1][:200] if result.stderr else ''} |")
        print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration (after 1 warm-up)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (minutes of compilation)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    from experiments.bench.bench_stages import compose_cfg, moments, pixels, time_steps
    from ldm_lab.config.schema import register_configs

    register_configs()
    device = torch.cuda.get_device_name(0)
    peak = bf16_matmul_peak()
    lines = [f"# GPU check: {device}", "", f"`make gpu-check` on {torch.cuda.device_count()} x {device}, torch "
             f"{torch.__version__}, CUDA {torch.version.cuda}. bf16 matmul 8192^3: {peak / 1e12:.0f} TFLOP/s.", "",
             "## Memory of a training step: task=plan against the GPU", "", *memory_rows(compose_cfg), "",
             "## Stages at their real size (bf16-mixed, one micro-batch per step)", "",
             *speed_rows(compose_cfg, time_steps, pixels, moments, args.steps, peak), "",
             "## Speed options, each off and on (the others at their defaults)", "",
             *option_rows(compose_cfg, time_steps, pixels, moments, args.steps, not args.no_compile), ""]
    if torch.cuda.device_count() >= 2:
        lines += ["## DDP", "", *ddp_rows(), ""]
    out = ROOT / "experiments" / "gpu" / f"{re.sub(r'[^A-Za-z0-9]+', '_', device).strip('_')}.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
