"""The quickstart LDM's recipe options side by side at a fixed CPU budget: each recipe trained with
experiment=quickstart_ldm on the same first stage for each seed, then task=evaluate on 64 samples with the
offline metric (FID and precision/recall against the data-vs-data floor). Prints a markdown table of the
mean and spread over seeds and writes it, with every run's figures, to <out>/results.md and results.json.
Runs already in <out>/results.json are kept and not run again: a stopped comparison resumes, and
`--seeds 2` adds a seed to it.

    .venv/bin/python experiments/quickstart_recipes/compare.py --first-stage <quickstart run>/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# experiment=quickstart_ldm's objective and sampler when these recipes were measured (issue 24 made it rectified flow)
DDPM_DDIM_200 = ["model/objective=ddpm", "sample.sampler=ddim", "sample.num_inference_steps=200"]
EPSILON = "model.objective.noise_scheduler.prediction_type=epsilon"
V = "model.objective.noise_scheduler.prediction_type=v_prediction"
LR = "model.lr=2e-5"  # session 5's quickstart
UNIFORM = "model.objective.timestep_density.weighting_scheme=uniform"  # LDM's timesteps
LOGIT_NORMAL_MINUS_1 = ["model.objective.timestep_density.weighting_scheme=logit_normal",
                        "model.objective.timestep_density.logit_mean=-1.0", "model.objective.timestep_density.logit_std=1.0"]
RECIPES = {  # each says every option it depends on, whatever experiment=quickstart_ldm sets
    "epsilon (LDM)": [EPSILON, LR, UNIFORM],
    "v-prediction": [V, LR, UNIFORM],
    "v-prediction, lr 8e-5": [V, "model.lr=8e-5", UNIFORM],
    "min-SNR-5 (epsilon)": [EPSILON, LR, UNIFORM, "model.objective.snr_gamma=5"],
    "v + zero terminal SNR, trailing": [V, LR, UNIFORM, "model.objective.noise_scheduler.rescale_betas_zero_snr=true",
                                        "model.objective.ddim.timestep_spacing=trailing", "model.objective.ddim.steps_offset=0"],
    "v, lr 8e-5, logit-normal timesteps, 4000 steps": [V, "model.lr=8e-5", *LOGIT_NORMAL_MINUS_1, "max_steps=4000",
                                                        "model.denoiser.block_out_channels=[32,64,64]"],
    "v, lr 4e-5, logit-normal timesteps, UNet 48/96/96, 2500 steps": [
        V, "model.lr=4e-5", *LOGIT_NORMAL_MINUS_1, "max_steps=2500", "model.denoiser.block_out_channels=[48,96,96]"],
}


def run(args: list[str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w") as file:
        subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, stdout=file, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - start


def main(recipes: dict[str, list[str]] = RECIPES, out: Path = ROOT / "outputs" / "quickstart_recipes",
         description: str = __doc__, protocol: list[str] = DDPM_DDIM_200) -> None:
    """Train and evaluate each of ``recipes`` (name -> overrides of experiment=quickstart_ldm) for each seed, with
    the overrides of ``protocol`` (what every recipe shares, the evaluation's sampler too) before the recipe's."""
    parser = argparse.ArgumentParser(description=description.splitlines()[0])
    parser.add_argument("--first-stage", help="the first stage's checkpoint (a quickstart run's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--recipes", nargs="+", default=list(recipes), choices=list(recipes))
    parser.add_argument("--out", type=Path, default=out)
    parser.add_argument("--table-only", action="store_true", help="the table of the runs in <out>/results.json")
    parser.add_argument("overrides", nargs="*", help="more overrides for every training run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    saved = args.out / "results.json"
    results = json.loads(saved.read_text()) if saved.is_file() else []
    if args.table_only:
        write_table(results, args.out)
        return
    if args.first_stage is None:
        parser.error("--first-stage is needed to train")
    done = {(r["recipe"], r["seed"]) for r in results}
    for seed in args.seeds:  # seed by seed: a comparison stopped early still compares every recipe
        for recipe in (r for r in args.recipes if (r, seed) not in done):
            folder = args.out / f"{''.join(c if c.isalnum() else '_' for c in recipe)}-seed{seed}"
            common = ["experiment=quickstart_ldm", f"seed={seed}", *protocol, *args.overrides]
            train = run([*common, *recipes[recipe], f"model.first_stage={args.first_stage}", "overwrite=true",
                         f"hydra.run.dir={folder}"], folder.with_suffix(".train.log"))
            run([*common, "task=evaluate", f"evaluate.model={folder / 'checkpoints' / 'last.ckpt'}",
                 "evaluate.num_samples=64", f"hydra.run.dir={folder / 'evaluation'}"], folder.with_suffix(".eval.log"))
            figures = json.loads((folder / "evaluation" / "evaluation.json").read_text())
            results.append({"recipe": recipe, "seed": seed, "train_s": round(train), **figures})
            saved.write_text(json.dumps(results, indent=1))  # kept if stopped early
            print(f"{recipe}, seed {seed}: FID {figures['fid']:.1f} (floor {figures['floor_fid']:.1f}), precision "
                  f"{figures['precision']:.2f}, recall {figures['recall']:.2f}, {train:.0f} s", flush=True)
    write_table(results, args.out)


def write_table(results: list[dict], out: Path) -> None:
    """The mean and spread over seeds of each recipe, to results.md and the console."""
    def spread(values: list[float]) -> str:
        return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"

    rows = ["| recipe | seeds | training s | FID | FID / floor | precision | recall |",
            "|---|---|---:|---:|---:|---:|---:|"]
    for recipe in dict.fromkeys(r["recipe"] for r in results):
        runs = [r for r in results if r["recipe"] == recipe]
        rows.append(f"| {recipe} | {', '.join(str(r['seed']) for r in runs)} | "
                    f"{', '.join(str(r['train_s']) for r in runs)} | {spread([r['fid'] for r in runs])} | "
                    f"{spread([r['fid'] / r['floor_fid'] for r in runs])} | {spread([r['precision'] for r in runs])} | "
                    f"{spread([r['recall'] for r in runs])} |")
    floors = [r["floor_fid"] for r in results]
    table = "\n".join(rows) + f"\n\nfloor FID {min(floors):.2f}-{max(floors):.2f} (64 held-out real images)\n"
    (out / "results.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
