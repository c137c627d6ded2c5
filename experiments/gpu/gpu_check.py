"""make gpu-check: what the lab's CPU machines cannot measure, on a CUDA machine.

    make gpu-check        (or: python experiments/gpu/gpu_check.py [--steps N] [--no-compile])

1. Memory: task=plan's prediction (traced on the CPU) against torch.cuda.max_memory_allocated() of real
   training steps, for experiment=sd_vae_4060ti, celebahq_ldm_vq4 and imagenet100_dit_b2 (the goal: within 10%).
2. Speed of each stage at its real size: images/s, and the fraction of this GPU's bf16 peak (a measured
   8192^3 bf16 matmul) that a step achieves (FLOPs from torch.utils.flop_counter).
3. Each speed option (conf/speed) off and on: channels_last, torch.compile, fused AdamW, SDPA attention.
4. Whether the LDM's step keeps the GPU busy: the step at 1x and 4x its micro-batch, and the share of one
   profiled step's wall time that GPU kernels run.
5. With two or more GPUs, a 2-process DDP run against a 1-GPU run of the same job.

Writes experiments/gpu/<device>.md (or --out), section by section: a run stopped at a time limit keeps what it
measured, and a configuration that fails is a row saying why, not the end of the check. Without CUDA it says so
and exits 0: nothing to measure.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
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
          ("LDM-VQ-4 UNet, cached latents (celebahq_ldm_vq4)", ["experiment=celebahq_ldm_vq4"], 256, True),
          ("DiT-B/2 rectified flow, 100 classes, cached f8 latents (imagenet100_dit_b2)",
           ["experiment=imagenet100_dit_b2"], 256, True)]
# memory: the plan against the GPU
PRESETS = ("sd_vae_4060ti", "celebahq_ldm_vq4", "imagenet100_dit_b2", "t2i_4060ti", "t2i_dit_4060ti")
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


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def failed(label: str, columns: int, error: BaseException) -> str:
    """The table row of a configuration that raised: its label, then the error's first line."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    traceback.print_exception(error)
    first = (str(error).splitlines() or [""])[0].replace("|", "/")[:300]
    return "| " + " | ".join([label, f"failed: {type(error).__name__}: {first}"] + [""] * (columns - 2)) + " |"


def memory_rows(compose_cfg) -> list[str]:
    from ldm_lab.tasks.plan import plan

    rows = ["| config | predicted (task=plan, traced on the CPU) | measured max_memory_allocated | measured / predicted |",
            "|---|---:|---:|---:|"]
    for preset in PRESETS:
        try:
            cfg = compose_cfg(f"experiment={preset}", f"paths.output_dir={tempfile.mkdtemp()}")
            predicted = plan(cfg)["total"]
            measured = measured_peak(cfg)
            rows.append(f"| experiment={preset} | {predicted / GIB:.2f} GiB | {measured / GIB:.2f} GiB | "
                        f"{measured / predicted:.2f} |")
        except Exception as error:  # one failing preset is a row, the check goes on
            rows.append(failed(f"experiment={preset}", 4, error))
        print(rows[-1], flush=True)
    return rows


def speed_rows(compose_cfg, time_steps, pixels, moments, steps: int, peak: float) -> list[str]:
    rows = ["| stage | side | micro-batch | s/step | images/s | TFLOP/step | of the bf16 matmul peak |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for label, overrides, side, cached in STAGES:
        try:
            cfg = compose_cfg(*overrides, "model.accumulate_grad_batches=1")
            batch = cfg.data.batch_size
            result = time_steps(cfg, moments(cfg, batch, side) if cached else pixels(batch, side), steps)
            rows.append(f"| {label} | {side} | {batch} | {result['seconds']:.3f} | {batch / result['seconds']:.1f} | "
                        f"{result['flops'] / 1e12:.2f} | {result['flops'] / result['seconds'] / peak:.0%} |")
        except Exception as error:
            rows.append(failed(label, 7, error))
        print(rows[-1], flush=True)
    return rows


def option_rows(compose_cfg, time_steps, pixels, moments, steps: int, compile_too: bool) -> list[str]:
    """Each option off and on, back to back, for the KL and the LDM stage; ``compile`` last (minutes each)."""
    rows = ["| option | stage | off s/step | on s/step | on / off |", "|---|---|---:|---:|---:|"]
    options = [o for o in OPTIONS if o != "compile"] + (["compile"] if compile_too and "compile" in OPTIONS else [])
    for option in options:
        for label, overrides, side, cached in (STAGES[0], STAGES[2]):
            try:
                seconds = []
                for value in ("false", "true"):
                    cfg = compose_cfg(*overrides, "model.accumulate_grad_batches=1", f"speed.{option}={value}")
                    batch = cfg.data.batch_size
                    make = moments(cfg, batch, side) if cached else pixels(batch, side)
                    seconds.append(time_steps(cfg, make, steps)["seconds"])
                rows.append(f"| {option} | {label} | {seconds[0]:.3f} | {seconds[1]:.3f} | "
                            f"{seconds[1] / seconds[0]:.2f} |")
            except Exception as error:
                rows.append(failed(f"{option} | {label}", 4, error))
            print(rows[-1], flush=True)
    return rows


def batch_rows(compose_cfg, time_steps, moments, steps: int, peak: float) -> list[str]:
    """The LDM step at its preset's micro-batch and at 4x it: a step bound by launching kernels from Python
    takes about the same time for 4x the work."""
    label, overrides, side, _ = STAGES[2]
    rows = ["| stage | micro-batch | s/step | images/s | of the bf16 matmul peak |", "|---|---:|---:|---:|---:|"]
    base = compose_cfg(*overrides).data.batch_size
    for batch in (base, 4 * base):
        try:
            cfg = compose_cfg(*overrides, "model.accumulate_grad_batches=1", f"data.batch_size={batch}")
            result = time_steps(cfg, moments(cfg, batch, side), steps)
            rows.append(f"| {label} | {batch} | {result['seconds']:.3f} | {batch / result['seconds']:.1f} | "
                        f"{result['flops'] / result['seconds'] / peak:.0%} |")
        except Exception as error:
            rows.append(failed(f"{label} | {batch}", 4, error))
        print(rows[-1], flush=True)
    return rows


class ProfileOneStep(L.Callback):
    """torch.profiler over the optimizer step numbered ``at``: its wall time and its GPU kernels' time."""

    def __init__(self, at: int = 2):
        self.at, self.profiler, self.wall = at, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.step == self.at and self.profiler is None:
            from torch.profiler import ProfilerActivity, profile

            _sync()
            self.profiler = profile(activities=[ProfilerActivity.CPU]
                                    + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else []))
            self.profiler.__enter__()
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.profiler is not None and self.wall is None:
            _sync()
            self.wall = time.perf_counter() - self.start
            self.profiler.__exit__(None, None, None)


def profile_rows(compose_cfg, moments) -> list[str]:
    """One profiled LDM step: the share of its wall time that GPU kernels run, and the CPU operators that
    take the most time (what the GPU waits for when the share is low)."""
    from ldm_lab.tasks.plan import build_for_planning

    label, overrides, side, _ = STAGES[2]
    rows = ["| what | value |", "|---|---|"]
    try:
        cfg = compose_cfg(*overrides, "model.accumulate_grad_batches=1")
        stage = build_for_planning(cfg)
        stage.max_steps = 3
        make = moments(cfg, cfg.data.batch_size, side)
        callback = ProfileOneStep(at=2)
        trainer = L.Trainer(accelerator="auto", devices=1, precision=cfg.trainer.precision, max_epochs=-1,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                            callbacks=[callback])
        trainer.fit(stage, train_dataloaders=torch.utils.data.DataLoader([make() for _ in range(3)], batch_size=None))
        events = callback.profiler.key_averages()
        kernels = sum(e.self_device_time_total for e in events) / 1e6
        rows += [f"| {label}: wall time of one profiled step | {callback.wall:.3f} s |",
                 f"| GPU kernel time in it | {kernels:.3f} s ({kernels / callback.wall:.0%} of the wall time) |"]
        top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
        rows += [f"| CPU: {e.key[:60]} (x{e.count}) | {e.self_cpu_time_total / 1e6:.3f} s |" for e in top]
        del stage, trainer
    except Exception as error:
        rows.append(failed(label, 2, error))
    print("\n".join(rows), flush=True)
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
    parser.add_argument("--out", type=Path, help="the report's path (default: experiments/gpu/<device>.md)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    from experiments.bench.bench_stages import compose_cfg, moments, pixels, time_steps
    from ldm_lab.config.schema import register_configs

    register_configs()
    device = torch.cuda.get_device_name(0)
    out = args.out or ROOT / "experiments" / "gpu" / f"{re.sub(r'[^A-Za-z0-9]+', '_', device).strip('_')}.md"
    peak = bf16_matmul_peak()
    lines = [f"# GPU check: {device}", "", f"`make gpu-check` on {torch.cuda.device_count()} x {device}, torch "
             f"{torch.__version__}, CUDA {torch.version.cuda}. bf16 matmul 8192^3: {peak / 1e12:.0f} TFLOP/s.", ""]
    sections: list[tuple[str, Callable[[], list[str]]]] = [
        ("Memory of a training step: task=plan against the GPU", lambda: memory_rows(compose_cfg)),
        ("Stages at their real size (bf16-mixed, one micro-batch per step)",
         lambda: speed_rows(compose_cfg, time_steps, pixels, moments, args.steps, peak)),
        ("Does the LDM step keep the GPU busy?", lambda: batch_rows(compose_cfg, time_steps, moments, args.steps, peak)
         + [""] + profile_rows(compose_cfg, moments)),
        ("Speed options, each off and on (the others at their defaults)",
         lambda: option_rows(compose_cfg, time_steps, pixels, moments, args.steps, not args.no_compile))]
    if torch.cuda.device_count() >= 2:
        sections.append(("DDP", ddp_rows))
    for title, rows in sections:
        start = time.perf_counter()
        lines += [f"## {title}", "", *rows(), "", f"({time.perf_counter() - start:.0f} s)", ""]
        out.write_text("\n".join(lines) + "\n")  # each section as soon as it is measured
        print(f"written: {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
