"""The convergence recipes at the quickstart's budget: each trained with experiment=quickstart_ldm (the tiny UNet,
rectified flow, 4000 steps) on one first stage for each seed, then task=evaluate on 64 samples (FID / floor,
precision, recall in the synthetic feature network's space). A post-hoc EMA run first picks its width with
task=ema_sweep on other noise (sample.seed + 100: the width is not chosen on the samples that score it) and is
scored on that width's export. Resumable: runs in <out>/results.json are kept.

    .venv/bin/python experiments/convergence/compare.py --first-stage <quickstart run>/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from experiments.quickstart_recipes.compare import run, write_table  # noqa: E402

# The quickstart's recipe before this experiment, under every recipe (a recipe's own value of a key wins)
BASE = ["model.ema_decay=0.999", "model.posthoc_ema.sigma_rels=null", "model.representation.loss=null",
        "max_steps=4000"]
POSTHOC = ["model.ema_decay=null", "model.posthoc_ema.sigma_rels=[0.05,0.10]", "model.posthoc_ema.snapshot_every=250"]
DISPERSIVE = ["model.representation.loss=dispersive"]
SRA = ["model.representation.loss=sra"]
REPA = ["model.representation.loss=repa"]  # needs facebook/dinov2-base (downloaded once): not run offline
# experiments/objectives' DiT: hidden 128 (4 heads x 32), depth 6, at a constant 1e-3; patch 2 (64 tokens) or 1
DIT = ["model=dit_tiny", "model.denoiser.attention_head_dim=32", "model.denoiser.num_layers=6", "model.lr=1e-3"]
ROUTED = ["model.token_routing.ratio=0.5", "model.token_routing.start=1", "model.token_routing.end=-1"]
RECIPES = {  # overrides of experiment=quickstart_ldm and BASE; steps from step_times.md, at the UNet's 4000 steps' time
    "fixed EMA 0.999 (the quickstart's until now)": [],
    "post-hoc EMA": POSTHOC,
    "dispersive loss": DISPERSIVE,
    "dispersive loss, post-hoc EMA": [*DISPERSIVE, *POSTHOC],
    "SRA": SRA,
    "REPA (DINOv2-B)": REPA,
    "DiT-S/2-ish": DIT,
    "DiT-S/2-ish, token routing 0.5": [*DIT, *ROUTED],
    "DiT-S/2-ish, SRA": [*DIT, *SRA],
    "DiT patch 1": [*DIT, "model.denoiser.patch_size=1"],
    "DiT patch 1, token routing 0.5": [*DIT, "model.denoiser.patch_size=1", *ROUTED],
}
# recipe -> max_steps where a step takes another time than the UNet's: 4000 x the UNet's s / step over its own, the
# mean of step_times.md's two runs (DiT 1.29x the UNet's, routed 0.77x, patch 1 5.2x, patch 1 routed 2.8x; SRA
# 1.26x, DiT with SRA 1.62x, from its two other runs)
STEPS = {"DiT-S/2-ish": 3100, "DiT-S/2-ish, token routing 0.5": 5200, "DiT patch 1": 770,
         "DiT patch 1, token routing 0.5": 1430, "SRA": 3200, "DiT-S/2-ish, SRA": 2500}
SWEEP = "ema_sweep.sigma_rels=[0.02,0.03,0.05,0.07,0.10,0.14,0.20,0.28]"


def overrides(recipe: str) -> list[str]:
    """The recipe's overrides (and its steps) after BASE's values for the keys it leaves alone."""
    own = [*RECIPES[recipe], *([f"max_steps={STEPS[recipe]}"] if recipe in STEPS else [])]
    keys = {o.split("=")[0] for o in own}
    return [*(o for o in BASE if o.split("=")[0] not in keys), *own]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--first-stage", required=True, help="the first stage's checkpoint (a quickstart run's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "convergence")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    saved = args.out / "results.json"
    results = json.loads(saved.read_text()) if saved.is_file() else []
    done = {(r["recipe"], r["seed"]) for r in results}
    for seed in args.seeds:
        for recipe in (r for r in args.recipes if (r, seed) not in done):
            folder = args.out / f"{''.join(c if c.isalnum() else '_' for c in recipe)}-seed{seed}"
            common = ["experiment=quickstart_ldm", f"seed={seed}"]
            train = run([*common, *overrides(recipe), f"model.first_stage={args.first_stage}", "overwrite=true",
                         f"hydra.run.dir={folder}"], folder.with_suffix(".train.log"))
            model, extra = folder / "checkpoints" / "last.ckpt", {}
            if "model.posthoc_ema.sigma_rels=[0.05,0.10]" in RECIPES[recipe]:
                run([*common, "task=ema_sweep", f"ema_sweep.run={folder}", SWEEP, "evaluate.num_samples=64",
                     f"sample.seed={seed + 100}", f"hydra.run.dir={folder / 'sweep'}"], folder.with_suffix(".sweep.log"))
                sweep = json.loads((folder / "sweep" / "ema_sweep.json").read_text())
                model = folder / "sweep" / "export"
                extra = {"sigma_rel": sweep["chosen"],
                         "sweep": {row["sigma_rel"]: row["fid"] / row["floor_fid"] for row in sweep["rows"]}}
            run([*common, "task=evaluate", f"evaluate.model={model}", "evaluate.num_samples=64",
                 f"hydra.run.dir={folder / 'evaluation'}"], folder.with_suffix(".eval.log"))
            figures = json.loads((folder / "evaluation" / "evaluation.json").read_text())
            results.append({"recipe": recipe, "seed": seed, "train_s": round(train), **extra, **figures})
            saved.write_text(json.dumps(results, indent=1))
            print(f"{recipe}, seed {seed}: FID / floor {figures['fid'] / figures['floor_fid']:.2f}, precision "
                  f"{figures['precision']:.2f}, recall {figures['recall']:.2f}, {train:.0f} s {extra}", flush=True)
    write_table(results, args.out)


if __name__ == "__main__":
    main()
