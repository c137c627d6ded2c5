"""Seconds per training step of each convergence recipe, side by side in one process on this machine, as the
Lightning loop runs them (experiments/bench/bench_step.py's ``lightning_step_seconds``): what sets each recipe's
steps at the UNet's 4000-step wall time. Writes experiments/convergence/step_times.md.

    .venv/bin/python experiments/convergence/step_times.py [--steps 20]
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "experiments" / "bench")]

import torch  # noqa: E402
from bench_step import lightning_step_seconds  # noqa: E402

from experiments.convergence.compare import RECIPES, STEPS, overrides  # noqa: E402
from ldm_lab.config.schema import register_configs  # noqa: E402

UNET_STEPS = 4000  # experiment=quickstart_ldm's


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "convergence" / "step_times.md")
    args = parser.parse_args()
    register_configs()
    seconds = {name: lightning_step_seconds(["experiment=quickstart_ldm", *overrides(name)], args.steps)
               for name in args.recipes}
    unet = seconds.get(args.recipes[0])
    rows = ["| recipe | s / step | / first | steps in the first's 4000 steps' time | steps set (compare.py) |",
            "|---|---:|---:|---:|---:|"]
    for name, value in seconds.items():
        rows.append(f"| {name} | {value:.3f} | {value / unet:.2f} | {UNET_STEPS * unet / value:.0f} | "
                    f"{STEPS.get(name, UNET_STEPS)} |")
        print(rows[-1], flush=True)
    out = args.out
    out.write_text("\n".join([f"# Step times ({platform.processor() or platform.machine()}, "
                              f"{torch.get_num_threads()} threads)", "", *rows, ""]))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
