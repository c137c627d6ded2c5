"""The quickstart's budget split between its two stages: first stages of --first-stage-steps steps (the PatchGAN on
the last 300 of each, as experiment=quickstart has it), each followed by experiment=quickstart_ldm (its recipe as
it is) for the steps that the budget of 2400 + 4000 steps (the quickstart's before this experiment) leaves, at the
step times measured side by side here; then each first stage's ceiling (its reconstructions scored as samples:
experiments/quickstart_recipes/ceiling.py) and the LDM's FID / floor by task=evaluate on 64 samples. As in
compare.py, a seed is the LDM's and the evaluation's (its held-out split): every seed trains on the same first
stage of each length (trained with seed 0). Resumable: runs in <out>/results.json are kept.

    .venv/bin/python experiments/convergence/split.py [--first-stage-steps 1200 2400 3600] [--seeds 0]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "experiments" / "bench")]

import torch  # noqa: E402
from bench_stages import compose_cfg, pixels, time_steps  # noqa: E402

from experiments.quickstart_recipes.ceiling import first_stage_ceiling  # noqa: E402
from experiments.quickstart_recipes.compare import run  # noqa: E402
from ldm_lab.config.schema import register_configs  # noqa: E402
from ldm_lab.tasks.report import read_scalars  # noqa: E402

FIRST_STAGE_STEPS, LDM_STEPS, GAN_STEPS = 2400, 4000, 300  # the budget's two stages, the PatchGAN's last steps


def step_seconds(steps: int) -> dict[str, float]:
    """Median seconds per training step of the first stage without and with the PatchGAN (without LPIPS, as
    offline), and of the LDM, one after the other in this process (random batches of the quickstarts' shapes)."""
    seconds = {}
    for label, start in (("first stage", 10**6), ("first stage, GAN", 0)):
        cfg = compose_cfg("experiment=quickstart", f"model.loss.disc_start={start}", "model.loss.perceptual_weight=0",
                          "model.metrics.lpips=false", "model.metrics.rfid=false")
        seconds[label] = time_steps(cfg, pixels(cfg.data.batch_size, cfg.data.resolution), steps, model=cfg.model)
    ldm = compose_cfg("experiment=quickstart_ldm", "plan.first_stage=vae_tiny")
    latents = lambda: {"latents": torch.randn(ldm.data.batch_size, 8, 16, 16)}  # noqa: E731 (KL moments of 16x16x4)
    seconds["LDM"] = time_steps(ldm, latents, steps)
    return {label: result["seconds"] for label, result in seconds.items()}


def final_psnr(run_dir: Path) -> float:
    """The validation PSNR a first-stage run logged after training (its last in TensorBoard)."""
    return read_scalars(run_dir / "tensorboard")["val/psnr"][-1][1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--first-stage-steps", type=int, nargs="+", default=[1200, 2400, 3600])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--timing-steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "convergence" / "split")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    saved = args.out / "results.json"
    state = json.loads(saved.read_text()) if saved.is_file() else {"results": []}
    if "step_seconds" not in state:
        register_configs()
        state["step_seconds"] = step_seconds(args.timing_steps)
        state["machine"] = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        saved.write_text(json.dumps(state, indent=1))
    seconds = state["step_seconds"]
    print(f"s / step: {seconds}", flush=True)
    done = {(r["first_stage_steps"], r["seed"]) for r in state["results"]}
    for seed in args.seeds:
        for steps in (s for s in args.first_stage_steps if (s, seed) not in done):
            # the GAN's steps cost the same in every split: the plain steps trade against the LDM's
            ldm_steps = round(LDM_STEPS + (FIRST_STAGE_STEPS - steps) * seconds["first stage"] / seconds["LDM"])
            first = args.out / f"autoencoder-{steps}-seed0"
            if not (first / "checkpoints" / "last.ckpt").is_file():
                run(["experiment=quickstart", "seed=0", f"max_steps={steps}", f"val_every_n_steps={steps // 4}",
                     f"model.loss.disc_start={steps - GAN_STEPS}", "overwrite=true", f"hydra.run.dir={first}"],
                    first.with_suffix(".log"))
            checkpoint = first / "checkpoints" / "last.ckpt"
            ceiling = first_stage_ceiling(checkpoint, 64, [f"seed={seed}"])
            folder = args.out / f"ldm-{steps}-seed{seed}"
            common = ["experiment=quickstart_ldm", f"seed={seed}"]
            run([*common, f"max_steps={ldm_steps}", f"model.first_stage={checkpoint}", "overwrite=true",
                 f"hydra.run.dir={folder}"], folder.with_suffix(".train.log"))
            run([*common, "task=evaluate", f"evaluate.model={folder / 'checkpoints' / 'last.ckpt'}",
                 "evaluate.num_samples=64", f"hydra.run.dir={folder / 'evaluation'}"], folder.with_suffix(".eval.log"))
            figures = json.loads((folder / "evaluation" / "evaluation.json").read_text())
            state["results"].append({"first_stage_steps": steps, "ldm_steps": ldm_steps, "seed": seed,
                                     "psnr": final_psnr(first), "ceiling": ceiling["fid"] / ceiling["floor_fid"],
                                     **figures})
            saved.write_text(json.dumps(state, indent=1))
            print(f"first stage {steps} steps (ceiling {state['results'][-1]['ceiling']:.2f}x), LDM {ldm_steps} "
                  f"steps, seed {seed}: FID / floor {figures['fid'] / figures['floor_fid']:.2f}, precision "
                  f"{figures['precision']:.2f}, recall {figures['recall']:.2f}", flush=True)
    rows = ["| first stage steps | PSNR dB | LDM steps | seed | ceiling (reconstructions) / floor | FID / floor | "
            "precision | recall |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rows += [f"| {r['first_stage_steps']} | {r['psnr']:.2f} | {r['ldm_steps']} | {r['seed']} | {r['ceiling']:.2f} | "
             f"{r['fid'] / r['floor_fid']:.2f} | {r['precision']:.2f} | {r['recall']:.2f} |"
             for r in sorted(state["results"], key=lambda r: (r["seed"], r["first_stage_steps"]))]
    (args.out / "results.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
