"""{UNet, DiT} x {DDPM v-prediction, rectified flow} at the quickstart's budget: each pair trained with
experiment=quickstart_ldm on the same first stage for each seed, then task=evaluate on 64 samples (FID and
precision/recall against the data-vs-data floor), by experiments/quickstart_recipes/compare.py's loop (resumable:
runs already in <out>/results.json are kept). ``--samplers SEED [RECIPE ...]`` then evaluates that seed's runs with each sampler
of their objective at equal network evaluations (Heun: 2N - 1 for N steps) into <out>/samplers.json.

    .venv/bin/python experiments/objectives/compare.py --first-stage <quickstart run>/checkpoints/last.ckpt
    .venv/bin/python experiments/objectives/compare.py --samplers 2 "UNet, DDPM v" "UNet, rectified flow (the quickstart's)"
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from experiments.quickstart_recipes.compare import main, run  # noqa: E402

OUT = ROOT / "outputs" / "objectives"
RECTIFIED_FLOW = ["model/objective=rectified_flow", "model.objective.timestep_density.logit_mean=0.0"]  # SD3's (0, 1)
DDPM_V = ["model/objective=ddpm_v", "model.objective.timestep_density.weighting_scheme=logit_normal",
          "model.objective.timestep_density.logit_mean=-1.0"]  # experiments/quickstart_recipes' best
# every run's evaluation: the objective's own sampler (DDIM for DDPM, Euler for rectified flow) at 200 steps
PROTOCOL = ["sample.sampler=auto", "sample.num_inference_steps=200", "max_steps=4000"]  # quickstart_ldm's steps then
# A DiT of hidden 128 (4 heads x 32), depth 6, patch 2 (64 tokens of the 16x16 latents), at a constant 1e-3: its step
# takes 0.208 s on the CPU against the UNet's 0.146 (README.md), so 2800 steps take the UNet's 4000 steps' time
DIT = ["model=dit_tiny", "model.denoiser.attention_head_dim=32", "model.denoiser.num_layers=6", "model.lr=1e-3",
       "max_steps=2800"]
RECIPES = {
    "UNet, DDPM v": DDPM_V,
    "UNet, rectified flow (the quickstart's)": RECTIFIED_FLOW,
    "DiT, DDPM v": [*DIT, *DDPM_V],
    "DiT, rectified flow": [*DIT, *RECTIFIED_FLOW],
}
# sampler settings at 50, 100 and 200 network evaluations
SAMPLERS = {"ddpm": [("ddim", 50), ("ddim", 100), ("ddim", 200)],
            "rectified_flow": [("euler", 50), ("euler", 100), ("euler", 200), ("heun", 25), ("heun", 50),
                               ("heun", 100)]}


def evaluations(sampler: str, steps: int) -> int:
    return 2 * steps - 1 if sampler == "heun" else steps


def samplers(seed: int, recipes: list[str]) -> None:
    """``seed``'s run of each of ``recipes`` (all when empty), sampled by each sampler of its objective."""
    saved = OUT / "samplers.json"
    results = json.loads(saved.read_text()) if saved.is_file() else []
    done = {(r["recipe"], r["seed"], r["sampler"], r["steps"]) for r in results}
    for recipe, overrides in RECIPES.items():
        if recipes and recipe not in recipes:
            continue
        folder = OUT / f"{''.join(c if c.isalnum() else '_' for c in recipe)}-seed{seed}"
        objective = "rectified_flow" if RECTIFIED_FLOW[0] in overrides else "ddpm"
        for sampler, steps in SAMPLERS[objective]:
            if (recipe, seed, sampler, steps) in done or not (folder / "checkpoints" / "last.ckpt").is_file():
                continue
            out = folder / f"evaluation-{sampler}{steps}"
            run(["experiment=quickstart_ldm", f"seed={seed}", "task=evaluate", f"evaluate.model={folder / 'checkpoints' / 'last.ckpt'}",
                 "evaluate.num_samples=64", f"sample.sampler={sampler}", f"sample.num_inference_steps={steps}",
                 f"hydra.run.dir={out}"], out.with_suffix(".log"))
            figures = json.loads((out / "evaluation.json").read_text())
            results.append({"recipe": recipe, "seed": seed, "sampler": sampler, "steps": steps,
                            "evaluations": evaluations(sampler, steps), **figures})
            saved.write_text(json.dumps(results, indent=1))
    rows = ["| recipe | sampler | steps | network evaluations | FID / floor | precision | recall |",
            "|---|---|---:|---:|---:|---:|---:|"]
    for r in sorted(results, key=lambda r: (list(RECIPES).index(r["recipe"]), r["evaluations"], r["sampler"])):
        rows.append(f"| {r['recipe']} | {r['sampler']} | {r['steps']} | {r['evaluations']} | "
                    f"{r['fid'] / r['floor_fid']:.2f} | {r['precision']:.2f} | {r['recall']:.2f} |")
    (OUT / "samplers.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    if "--samplers" in sys.argv:
        at = sys.argv.index("--samplers")
        samplers(int(sys.argv[at + 1]), sys.argv[at + 2:])
    else:
        main(RECIPES, OUT, __doc__, PROTOCOL)
