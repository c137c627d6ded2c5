"""Stage benchmark: training-step throughput of the KL, VQ and LDM stages (tiny and full-size), the LDM
step on cached latents against encoding on the fly, DDIM-50 against DDPM-1000 sampling, the data loader
against what a step consumes, FLOPs per step and the achieved fraction of this machine's matmul and
convolution peak, and each speed option (conf/speed) against the defaults.

    make bench        (or: python experiments/bench/bench_stages.py [--steps N])

Writes experiments/bench/results/stages.md. Every time is the median over repeated steps after
warm-up steps; every comparison is a ratio of two figures measured in this run.
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from torch.utils.flop_counter import FlopCounterMode

from ldm_lab.config.schema import register_configs
from ldm_lab.diffusion.sampling import SamplingOptions, generate
from ldm_lab.nn.downsampling import downsampling
from ldm_lab.stages.build import build_stage
from ldm_lab.tasks.plan import planning_config
from ldm_lab.tasks.trainer import build_datamodule

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "experiments" / "bench" / "results" / "stages.md"
CUDA = torch.cuda.is_available()


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def compose_cfg(*overrides: str):
    """A run config with task=plan's options: its builders make the stages and batches timed here."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=["task=plan", "require_weights=false",
                                            "paths.output_dir=/tmp/ldm_lab_bench", *overrides])


class StepTimer(L.Callback):
    """Wall time of every optimizer step but the one whose FLOPs are counted."""

    def __init__(self, count_flops_at: int):
        self.times: list[float] = []
        self.count_flops_at = count_flops_at
        self.flops = 0
        self._counter: FlopCounterMode | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.step == self.count_flops_at:
            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()
        _sync()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        _sync()
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.flops, self._counter = self._counter.get_total_flops(), None
        else:
            self.times.append(time.perf_counter() - self._start)


def time_steps(cfg, make_batch, steps: int, model=None) -> dict:
    """Median seconds per optimizer step (batches from ``make_batch``) over ``steps`` steps after one
    warm-up step, which runs under the FLOP counter; the stage of ``model`` (a model config), else of task=plan's."""
    torch.manual_seed(0)
    stage = build_stage(model or planning_config(cfg), cfg.disc, cfg.speed)  # task=plan's: a latent scale of 1
    total = 1 + steps
    stage.max_steps = total
    timer = StepTimer(count_flops_at=0)
    trainer = L.Trainer(accelerator="auto", devices=1, precision=cfg.trainer.precision, max_epochs=-1, logger=False,
                        benchmark=cfg.speed.cudnn_benchmark if CUDA else None, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[timer])
    batches = [make_batch() for _ in range(total)]
    trainer.fit(stage, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    seconds = statistics.median(timer.times)
    del stage, trainer, batches  # a full-size stage holds gigabytes: free it before the next
    gc.collect()
    return {"seconds": seconds, "flops": timer.flops}


def pixels(batch: int, side: int):
    return lambda: {"pixel_values": torch.rand(batch, 3, side, side) * 2 - 1}


def moments(cfg, batch: int, side: int):
    """Random cached-latent batches shaped like the first stage's moments (KL: mean and logvar), with class
    labels for a class-conditional model."""
    first = planning_config(cfg).first_stage
    config = first["config"]
    channels = 2 * config["latent_channels"] if first["class_name"] == "AutoencoderKL" else config["vq_embed_dim"]
    factor = downsampling(config)
    if cfg.model.get("conditioning") != "class":
        return lambda: {"latents": torch.randn(batch, channels, side // factor, side // factor)}
    classes = len(planning_config(cfg).class_names)  # the plan's stand-ins
    return lambda: {"latents": torch.randn(batch, channels, side // factor, side // factor),
                    "class_labels": torch.randint(classes, (batch,))}


def median_seconds(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine_peaks() -> dict[str, float]:
    """This machine's fp32 FLOP/s on a large matmul and a large 3x3 convolution (medians)."""
    device = "cuda" if CUDA else "cpu"
    a = torch.randn(2048, 2048, device=device)
    matmul = 2 * 2048**3 / median_seconds(lambda: a @ a)
    conv = torch.nn.Conv2d(128, 128, 3, padding=1).to(device)
    x = torch.randn(8, 128, 64, 64, device=device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        conv(x)
    with torch.no_grad():
        conv_peak = counter.get_total_flops() / median_seconds(lambda: conv(x))
    return {"matmul": matmul, "conv": conv_peak}


def loader_images_per_second(batch: int, side: int, workers: int, batches: int = 40) -> float:
    cfg = compose_cfg("model=vae_tiny", f"data.resolution={side}", f"data.batch_size={batch}",
                      f"data.num_workers={workers}", f"paths.data_dir={ROOT / 'data'}")
    datamodule = build_datamodule(cfg, 4)
    datamodule.prepare_data()
    datamodule.setup("fit")
    loader = iter(datamodule.train_dataloader())
    next(loader)
    start = time.perf_counter()
    seen = 0
    for _ in range(batches):
        try:
            seen += len(next(loader)["pixel_values"])
        except StopIteration:
            loader = iter(datamodule.train_dataloader())
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4, help="timed steps per configuration (after 1 warm-up)")
    args = parser.parse_args()
    register_configs()
    peaks = machine_peaks()
    out: list[str] = []
    step_rows, option_rows = [], []

    def step(label, overrides, batch, side, cached=None):
        cfg = compose_cfg(*overrides, f"data.batch_size={batch}", f"data.resolution={side}")
        make = moments(cfg, batch, side) if cached else pixels(batch, side)
        result = time_steps(cfg, make, args.steps)
        achieved = result["flops"] / result["seconds"]
        step_rows.append((label, side, batch, result["seconds"], batch / result["seconds"], result["flops"],
                          achieved / peaks["matmul"], achieved / peaks["conv"]))
        print(f"{label} {side}px batch {batch}: {result['seconds']:.3f} s/step", flush=True)
        return result

    # Training steps: tiny and full-size, a few resolutions.
    tiny_vae = step("KL vae_tiny", ["model=vae_tiny"], 8, 64)
    step("KL vae (SD f8c4)", ["model=vae"], 2, 64)
    step("VQ vqvae_tiny", ["model=vqvae_tiny"], 8, 64)
    step("VQ vqvae (LDM f4)", ["model=vqvae"], 2, 64)
    ldm_tiny = ["model=unet_tiny", "plan.first_stage=vqvae"]
    tiny_cached = step("LDM unet_tiny, cached latents", ldm_tiny, 8, 64, cached=True)
    step("LDM unet_tiny, cached latents", ldm_tiny, 8, 128, cached=True)
    tiny_live = step("LDM unet_tiny, encoding on the fly", [*ldm_tiny, "model.latent_cache=false"], 8, 64)
    ldm_full = ["model=unet", "plan.first_stage=vqvae"]
    # At 128 px (32x32 latents) the UNet's compute, not the AdamW and EMA updates of its 274M
    # parameters, dominates a CPU step: the side where the options and the cache are compared.
    full_cached = step("LDM unet (LDM-VQ-4), cached latents", ldm_full, 2, 128, cached=True)
    full_live = step("LDM unet (LDM-VQ-4), encoding on the fly", [*ldm_full, "model.latent_cache=false"], 2, 128)

    # Speed options: each timed off and on back to back (CPU timings drift by tens of percent over
    # minutes; adjacent pairs keep the ratio honest).
    def option(label, base, without, with_, batch, side, cached):
        cfg = [f"data.batch_size={batch}", f"data.resolution={side}"]
        make = moments(compose_cfg(*base, *cfg), batch, side) if cached else pixels(batch, side)
        off = time_steps(compose_cfg(*base, without, *cfg), make, args.steps)["seconds"]
        on = time_steps(compose_cfg(*base, with_, *cfg), make, args.steps)["seconds"]
        option_rows.append((label, f"{base[0].split('=')[1]}, {side} px, batch {batch}", off, on))
        print(f"{label}: {off:.3f} -> {on:.3f} s/step", flush=True)

    option("channels_last", ["model=vae"], "speed.channels_last=false", "speed.channels_last=true", 2, 64, False)
    option("channels_last", ldm_full, "speed.channels_last=false", "speed.channels_last=true", 2, 128, True)
    option("SDPA attention (off: classic matmul-softmax)", ldm_full, "speed.sdpa=false", "speed.sdpa=true", 2, 128,
           True)
    option("gradient checkpointing", ldm_full, "model.gradient_checkpointing=false",
           "model.gradient_checkpointing=true", 2, 128, True)
    if CUDA:
        option("fused AdamW", ldm_full, "speed.fused_adamw=false", "speed.fused_adamw=true", 2, 128, True)
        option("cudnn.benchmark", ldm_full, "speed.cudnn_benchmark=false", "speed.cudnn_benchmark=true", 2, 128, True)

    # Sampling: seconds per image, DDIM 50 against DDPM 1000, same UNet.
    cfg = compose_cfg(*ldm_tiny, "data.resolution=64")
    stage = build_stage(planning_config(cfg), None).eval().to("cuda" if CUDA else "cpu")

    def sample(sampler, steps):
        options = SamplingOptions(sampler=sampler, num_inference_steps=steps, batch_size=4)
        return lambda: generate(stage.pipeline(), options, 4, 64, 64, torch.Generator().manual_seed(0))

    ddim = median_seconds(sample("ddim", 50), repeats=3) / 4
    ddpm = median_seconds(sample("ddpm", 1000), repeats=1) / 4

    # The loader against the steps it feeds.
    loader = {w: loader_images_per_second(8, 64, w) for w in (0, 2)}

    device = torch.cuda.get_device_name() if CUDA else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    out += ["# Stage benchmark", "",
            f"Machine: {device}; torch {torch.__version__}; fp32 unless the precision says otherwise.",
            f"Command: `python experiments/bench/bench_stages.py --steps {args.steps}` (`make bench`). Times are "
            f"medians over {args.steps} steps after a warm-up step (which the FLOP counter runs); full-size models at small sides, so a CPU "
            "finishes. KL and VQ steps include the discriminator and LPIPS (random backbone: the same network).",
            "", f"Machine peak (fp32): matmul 2048^3 {peaks['matmul'] / 1e9:.1f} GFLOP/s, 3x3 convolution "
            f"128->128 at 64x64 {peaks['conv'] / 1e9:.1f} GFLOP/s.", "",
            "| training step | side (px) | batch | s/step | images/s | GFLOP/step | of matmul peak | of conv peak |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    out += [f"| {label} | {side} | {batch} | {seconds:.3f} | {ips:.1f} | {flops / 1e9:.1f} | {of_mm:.0%} | {of_conv:.0%} |"
            for label, side, batch, seconds, ips, flops, of_mm, of_conv in step_rows]
    out += ["", "| LDM step on the LDM f4 VQ-VAE's latents, same settings | on the fly / cached (time per step) |",
            "|---|---:|",
            f"| unet_tiny, 64 px, batch 8 | {tiny_live['seconds'] / tiny_cached['seconds']:.1f}x |",
            f"| unet (274M), 128 px, batch 2 | {full_live['seconds'] / full_cached['seconds']:.1f}x |",
            "", "| speed option | model | off: s/step | on: s/step | on / off |",
            "|---|---|---:|---:|---:|"]
    out += [f"| {label} | {model} | {off:.3f} | {on:.3f} | {on / off:.2f}x |"
            for label, model, off, on in option_rows]
    if not CUDA:
        out += ["", "fused AdamW and cudnn.benchmark act on CUDA only; torch.compile is off by default and not "
                "timed here (minutes of compilation)."]
    out += ["", "| sampling, unet_tiny, 64 px | s/image | ratio |", "|---|---:|---:|",
            f"| DDIM, 50 steps | {ddim:.3f} | 1.0x |", f"| DDPM, 1000 steps | {ddpm:.3f} | {ddpm / ddim:.1f}x |",
            "", "| data loader (synthetic, 64 px, batch 8) | images/s | vs the KL vae_tiny step at 64 px |",
            "|---|---:|---:|"]
    tiny_ips = 8 / tiny_vae["seconds"]
    out += [f"| num_workers={w} | {ips:.0f} | {ips / tiny_ips:.1f}x |" for w, ips in loader.items()]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(out) + "\n")
    print("\n".join(out))
    print(f"written: {RESULTS}")


if __name__ == "__main__":
    main()
