"""Where a quickstart training step's time goes, on this machine: the denoiser's forward, backward and AdamW step
alone; with the EMA update; the whole Lightning step as training runs it (the loop, logging, the stage's counters
and checks, batches from a loader), start to start; the network compiled with torch.compile, whole
(``speed.compile=true``) and block by block (``speed.compile=blocks``), with their compile times; and the DiT's step
with token routing (``model.token_routing.ratio=0.5``). For the quickstart's UNet (``experiment=quickstart_ldm``:
batch 32 of 16x16x4 latents, rectified flow) and the DiT of the same size class (``model=dit_tiny``). Then the
UNet's blocks compiled under three bucket shapes: how many graphs dynamo compiled, and whether any frame hit its
recompile limit (and fell back to eager).

    python experiments/bench/bench_step.py [--steps 30]

Writes experiments/bench/results/step.md. Each figure is the median over ``--steps`` steps after warm-up steps;
each comparison a ratio of two figures of this run. Compilation starts from an empty inductor cache.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="bench_step_inductor_"))  # compile cold

import lightning as L  # noqa: E402
import torch  # noqa: E402
from bench_stages import compose_cfg  # noqa: E402 (this folder's)
from torch._dynamo.utils import counters  # noqa: E402

from ldm_lab.config.schema import register_configs  # noqa: E402
from ldm_lab.stages.build import build_stage  # noqa: E402
from ldm_lab.stages.speed import compile_network  # noqa: E402
from ldm_lab.tasks.plan import planning_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "experiments" / "bench" / "results" / "step.md"
MODELS = {"UNet (quickstart_ldm)": ["experiment=quickstart_ldm"],
          "DiT (quickstart_ldm, model=dit_tiny)": ["experiment=quickstart_ldm", "model=dit_tiny"]}
WARMUP = 3
ROUTING = ["model.token_routing.ratio=0.5", "model.token_routing.start=0", "model.token_routing.end=2"]  # both blocks
BUCKET_SIDES = [(16, 16), (12, 20), (20, 12)]  # latent sides of three buckets of about the same area


class LimitHits(logging.Handler):
    """Counts dynamo's warnings that a frame hit its recompile limit (and runs eager from then on)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += "recompile_limit" in record.getMessage() or "cache_size_limit" in record.getMessage()

    def __enter__(self) -> LimitHits:
        logging.getLogger("torch._dynamo").addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("torch._dynamo").removeHandler(self)


class StartToStart(L.Callback):
    """Seconds between the starts of consecutive training batches: everything a step costs."""

    def __init__(self):
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.starts.append(time.perf_counter())

    def seconds(self) -> float:
        return statistics.median(b - a for a, b in zip(self.starts[WARMUP:], self.starts[WARMUP + 1:], strict=False))


def stage_and_batches(overrides: list[str], count: int):
    """A fresh stage of the config (a random first stage of model/vae_tiny's kind: the step never decodes) and
    ``count`` batches of random cached moments, 32 of 8x16x16 (KL mean and log-variance of 16x16x4 latents)."""
    torch.manual_seed(0)
    cfg = compose_cfg(*overrides, "plan.first_stage=vae_tiny")
    stage = build_stage(planning_config(cfg), cfg.disc, cfg.speed)
    batches = [{"latents": torch.randn(cfg.data.batch_size, 8, 16, 16)} for _ in range(count)]
    return cfg, stage, batches


def network_step_seconds(overrides: list[str], steps: int, ema: bool, compile: bool | str = False,
                         sides: list[tuple[int, int]] | None = None) -> tuple[float, float]:
    """Median seconds of forward, backward and AdamW on the denoiser (and the EMA update), and the first step's
    seconds (compilation, when compiled: ``compile`` as speed.compile takes it); ``sides``: the batches' latent
    sides in turn (buckets), else square."""
    cfg, stage, batches = stage_and_batches(overrides, WARMUP + steps)
    if sides:
        batches = [{"latents": torch.randn(len(b["latents"]), 8, *sides[i % len(sides)])} for i, b in enumerate(batches)]
    compile_network(stage.denoiser, compile)  # in place, as speed.compile does
    optimizer = torch.optim.AdamW(stage.denoiser.parameters(), lr=1e-4)
    stage.latent_scale.fill_(1.0)
    times = []
    for index, batch in enumerate(batches):
        start = time.perf_counter()
        generator = torch.Generator().manual_seed(index)
        loss = stage.loss(stage.denoiser, stage.latents(batch, generator), generator, training=True)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema:
            stage.ema.update_parameters(stage.denoiser)
        times.append(time.perf_counter() - start)
    return statistics.median(times[WARMUP:]), times[0]


def lightning_step_seconds(overrides: list[str], steps: int) -> float:
    """Median seconds from one training batch's start to the next's, as task=train's loop runs them."""
    cfg, stage, batches = stage_and_batches(overrides, WARMUP + steps + 1)
    stage.max_steps = len(batches)
    timer = StartToStart()
    with tempfile.TemporaryDirectory() as scratch:  # the run folder: a post-hoc EMA recipe writes snapshots there
        trainer = L.Trainer(accelerator="cpu", devices=1, precision=cfg.trainer.precision, max_epochs=-1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=True, enable_model_summary=False,
                            limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=10, callbacks=[timer],
                            default_root_dir=scratch)
        trainer.fit(stage, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return timer.seconds()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30, help="timed steps per figure (after warm-up steps)")
    args = parser.parse_args()
    register_configs()
    torch.set_num_threads(torch.get_num_threads())
    rows = ["| model | network (fwd+bwd+AdamW) ms | + EMA ms | Lightning step, start to start ms | step / network | "
            "compiled whole ms | whole / eager | compile s | compiled blocks ms | blocks / eager | compile s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, overrides in MODELS.items():
        network, _ = network_step_seconds(overrides, args.steps, ema=False)
        with_ema, _ = network_step_seconds(overrides, args.steps, ema=True)
        step = lightning_step_seconds(overrides, args.steps)
        compiled = {}
        for how in ("network", "blocks"):
            torch._dynamo.reset()
            seconds, first = network_step_seconds(overrides, args.steps, ema=False, compile=how)
            compiled[how] = f"{seconds * 1e3:.0f} | {seconds / network:.2f} | {first - seconds:.0f}"
        rows.append(f"| {label} | {network * 1e3:.0f} | {with_ema * 1e3:.0f} | {step * 1e3:.0f} | {step / network:.2f} "
                    f"| {compiled['network']} | {compiled['blocks']} |")
        print(rows[-1], flush=True)
    dit = MODELS["DiT (quickstart_ldm, model=dit_tiny)"]
    plain, routed = (lightning_step_seconds([*dit, *extra], args.steps) for extra in ([], ROUTING))
    routing = ["| DiT Lightning step ms | with token routing 0.5 ms | routed / plain |", "|---:|---:|---:|",
               f"| {plain * 1e3:.0f} | {routed * 1e3:.0f} | {routed / plain:.2f} |"]
    print(routing[-1], flush=True)
    buckets = ["| model, compiled blocks | latent sides in turn | graphs compiled | recompile limit hit |",
               "|---|---|---:|---:|"]
    for label, overrides in list(MODELS.items())[:1]:  # the DiT takes square latents only
        torch._dynamo.reset()
        counters.clear()
        with LimitHits() as hits:
            network_step_seconds(overrides, 6, ema=False, compile="blocks", sides=BUCKET_SIDES)
        buckets.append(f"| {label} | {', '.join(f'{h}x{w}' for h, w in BUCKET_SIDES)} | "
                       f"{counters['stats']['unique_graphs']} | {hits.count} |")
        print(buckets[-1], flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join([f"# Training step breakdown ({platform.processor() or platform.machine()}, "
                                  f"{torch.get_num_threads()} threads, torch {torch.__version__})", "", *rows, "",
                                  "## Token routing", "", *routing, "", "## Compiled blocks under buckets", "",
                                  *buckets, ""]))
    print(f"written: {RESULTS}")


if __name__ == "__main__":
    main()
