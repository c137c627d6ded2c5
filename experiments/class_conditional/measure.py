"""The class-conditional quickstart measured: experiment=quickstart_class trained on one first stage for each
seed, then task=evaluate on the same noise at guidance 0 (the same model's unconditional prediction: the chance
baseline), 1, 1.5, 3 and 5 (class accuracy from the synthetic data's feature network; FID and precision/recall
against the data-vs-data floor), and the time of guided against unguided sampling. Writes <out>/results.json
(every run's figures) and <out>/results.md (mean and spread over seeds). Seeds already in results.json are kept,
and a seed whose training finished is not trained again: a stopped measurement resumes.

    .venv/bin/python experiments/class_conditional/measure.py --first-stage <autoencoder run>/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
SCALES = [0.0, 1.0, 1.5, 3.0, 5.0]
FIGURES = ("class_accuracy", "fid", "precision", "recall")


def run(args: list[str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w") as file:
        subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, stdout=file, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - start


def sampling_seconds(checkpoint: Path, num_images: int, steps: int) -> dict[str, float]:
    """Seconds to draw ``num_images`` with DDIM-``steps`` unguided (scale 1: one pass a step) and guided (two)."""
    from ldm_lab.diffusion.sampling import SamplingOptions, generate
    from ldm_lab.io.model_sources import load_latent_diffusion

    pipeline = load_latent_diffusion(checkpoint, "checkpoint")
    labels = [i % len(pipeline.config.class_names) for i in range(num_images)]
    options = SamplingOptions(num_inference_steps=steps, batch_size=num_images)
    seconds = {}
    for scale in (1.0, 3.0, 1.0, 3.0):  # twice each, alternating: the machine's speed drifts
        start = time.perf_counter()
        generate(pipeline, options, num_images, 32, 32, torch.Generator().manual_seed(0), class_labels=labels,
                 guidance_scale=scale)
        seconds.setdefault(f"guidance {scale:g}", []).append(time.perf_counter() - start)
    return {name: min(times) for name, times in seconds.items()}


def table(results: list[dict]) -> str:
    def cell(values: list[float], percent: bool = False) -> str:
        scale = 100 if percent else 1
        mean = statistics.mean(values) * scale
        spread = statistics.stdev(values) * scale if len(values) > 1 else 0.0
        return f"{mean:.1f}{'%' if percent else ''} ± {spread:.1f}" if percent else f"{mean:.2f} ± {spread:.2f}"

    lines = [f"{len(results)} seeds ({', '.join(str(r['seed']) for r in results)}), mean ± standard deviation; "
             f"guidance 0 is the same model's unconditional prediction (its accuracy: chance, 1/K)", "",
             "| guidance scale | class accuracy | FID / floor | FID | precision | recall |",
             "|---:|---:|---:|---:|---:|---:|"]
    for scale in SCALES:
        at = f" @ guidance {scale:g}"
        figures = {name: [r["evaluation"][name + at] for r in results] for name in (*FIGURES, "floor_fid")}
        ratio = [f / floor for f, floor in zip(figures["fid"], figures["floor_fid"], strict=True)]
        lines.append(f"| {scale:g} | {cell(figures['class_accuracy'], percent=True)} | {cell(ratio)} | "
                     f"{cell(figures['fid'])} | {cell(figures['precision'])} | {cell(figures['recall'])} |")
    floor = [r["evaluation"]["floor_fid @ guidance 1"] for r in results]
    times = [r["sampling_seconds"] for r in results]
    guided = [t["guidance 3"] / t["guidance 1"] for t in times]
    lines += ["", f"Data-vs-data floor FID: {cell(floor)} (precision and recall of held-out real images: "
              f"{statistics.mean(r['evaluation']['floor_precision @ guidance 1'] for r in results):.2f}, "
              f"{statistics.mean(r['evaluation']['floor_recall @ guidance 1'] for r in results):.2f}).",
              f"Sampling 64 images with DDIM-200: {statistics.mean(t['guidance 1'] for t in times):.1f} s unguided, "
              f"{statistics.mean(t['guidance 3'] for t in times):.1f} s guided ({statistics.mean(guided):.2f}x); "
              f"training {statistics.mean(r['train_seconds'] for r in results) / 60:.1f} min per seed."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--first-stage", required=True, help="the autoencoder's checkpoint")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "class_conditional")
    parser.add_argument("--num-samples", type=int, default=64)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    saved = args.out / "results.json"
    results = json.loads(saved.read_text()) if saved.is_file() else []
    for seed in args.seeds:
        if any(r["seed"] == seed for r in results):
            continue
        folder, train_log = args.out / f"seed{seed}", args.out / f"seed{seed}_train.log"
        finished = train_log.is_file() and "validation after training" in train_log.read_text()
        train_seconds = float((folder / "train_seconds").read_text()) if finished else run(
            ["experiment=quickstart_class", f"seed={seed}", f"model.first_stage={args.first_stage}",
             f"hydra.run.dir={folder / 'ldm'}"], train_log)
        (folder / "train_seconds").write_text(f"{train_seconds:.1f}")
        checkpoint = folder / "ldm" / "checkpoints" / "last.ckpt"
        run(["experiment=quickstart_class", "task=evaluate", f"evaluate.model={checkpoint}",
             f"evaluate.num_samples={args.num_samples}", f"evaluate.guidance_scales=[{','.join(map(str, SCALES))}]",
             f"hydra.run.dir={folder / 'evaluation'}"], args.out / f"seed{seed}_evaluate.log")
        evaluation = json.loads((folder / "evaluation" / "evaluation.json").read_text())
        results.append({"seed": seed, "train_seconds": train_seconds, "evaluation": evaluation,
                        "sampling_seconds": sampling_seconds(checkpoint, 64, 200)})
        saved.write_text(json.dumps(results, indent=1))
        print(f"seed {seed}: " + ", ".join(f"{scale:g}: {evaluation[f'class_accuracy @ guidance {scale:g}']:.0%}"
                                            for scale in SCALES), flush=True)
    (args.out / "results.md").write_text(table(results) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
