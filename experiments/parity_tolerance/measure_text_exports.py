"""How far the lab's sampler and diffusers' own pipelines drift apart on the text exports, under the CPU code paths
and thread counts of measure.py: what tests/test_text_to_image.py's 2e-3 (absolute, images in [-1, 1]) must cover.

    python experiments/parity_tolerance/measure_text_exports.py   # writes text_exports.json, prints the table

Two tiny exports with random weights (a KL + UNet2DConditionModel + CLIP StableDiffusionPipeline folder and a KL +
PixArtTransformer2DModel + T5 PixArtAlphaPipeline folder) are sampled, as the tests sample them (2 DDIM steps,
guidance 3, 32 px, two prompts; and 50 steps), by the lab (``load_latent_diffusion`` + ``generate``) and by
diffusers' pipeline, each in a fresh process per setting and thread count; the figure is the largest
|lab - diffusers| over every pair of thread counts within a setting (the tests run the two in different processes).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import measure  # this folder's: its CPU settings
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))  # tests.helpers
SETTINGS = {name: variables for name, variables in measure.SETTINGS.items()  # the code paths that moved parity
            if name in ("as is", "ATen default (scalar)", "oneDNN AVX2 + ATen avx2 (CI's second run)", "oneDNN SSE41",
                        "all oldest")}
THREADS = (1, 2, 4)
STEPS = (2, 50)
PROMPTS = ["A Red Square ", "a blue square"]
CAPTIONS = ["a red square", "a blue square", "two green circles"]


def build(folder: Path) -> None:
    """The two export folders, random tiny weights, seeded."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        PixArtAlphaPipeline,
        PixArtTransformer2DModel,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    from tests.helpers import save_tiny_first_stage, save_tiny_text_encoder

    vae = AutoencoderKL.from_pretrained(save_tiny_first_stage("kl", folder / "kl"))
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    clip = save_tiny_text_encoder("clip", folder / "clip", CAPTIONS)
    torch.manual_seed(1)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=4, norm_num_groups=16)
    StableDiffusionPipeline(vae=vae, text_encoder=CLIPTextModel.from_pretrained(clip),
                            tokenizer=AutoTokenizer.from_pretrained(clip), unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder / "sd")
    t5 = save_tiny_text_encoder("t5", folder / "t5", CAPTIONS)
    torch.manual_seed(2)
    transformer = PixArtTransformer2DModel(sample_size=8, in_channels=4, out_channels=4, num_attention_heads=2,
                                           attention_head_dim=16, num_layers=2, cross_attention_dim=32,
                                           caption_channels=32)
    PixArtAlphaPipeline(tokenizer=AutoTokenizer.from_pretrained(t5), text_encoder=T5EncoderModel.from_pretrained(t5),
                        vae=vae, transformer=transformer, scheduler=scheduler).save_pretrained(folder / "pixart")


def worker(kind: str, sampler: str, folder: str, threads: int, out: str) -> None:
    """Save the samples of one export by one sampler at every step count."""
    torch.set_num_threads(threads)
    samples = {}
    for steps in STEPS:
        generator = torch.Generator().manual_seed(0)
        if sampler == "lab":
            from ldm_lab.diffusion.sampling import SamplingOptions, generate
            from ldm_lab.io.model_sources import load_latent_diffusion

            pipeline = load_latent_diffusion(folder, "sample.model")
            images = generate(pipeline, SamplingOptions(num_inference_steps=steps), 2, 32, 32, generator,
                              guidance_scale=3.0, prompts=PROMPTS)
        else:
            from diffusers import DiffusionPipeline

            pipe = DiffusionPipeline.from_pretrained(folder)
            extra = {"clean_caption": False, "use_resolution_binning": False, "max_sequence_length": 24} \
                if kind == "pixart" else {}
            images = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=3.0, height=32, width=32,
                          generator=generator, output_type="pt", **extra).images * 2 - 1
        samples[steps] = images.float()
    torch.save(samples, out)


def main() -> None:
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        build(folder)
        caps = {name for variables in SETTINGS.values() for name in variables}
        rows = []
        for setting, variables in SETTINGS.items():
            env = {**{k: v for k, v in os.environ.items() if k not in caps}, **variables}
            for kind in ("sd", "pixart"):
                outputs = {}
                for sampler, threads in itertools.product(("lab", "diffusers"), THREADS):
                    out = folder / f"{kind}-{sampler}-{threads}.pt"
                    subprocess.run([sys.executable, __file__, "--worker", kind, sampler, str(folder / kind),
                                    str(threads), str(out)], cwd=ROOT, check=True, env=env, capture_output=True)
                    outputs[sampler, threads] = torch.load(out)
                row = {"setting": setting, "export": kind}
                for steps in STEPS:
                    row[f"{steps} steps"] = max(float((outputs["lab", a][steps] - outputs["diffusers", b][steps])
                                                      .abs().max()) for a in THREADS for b in THREADS)
                rows.append(row)
                print(json.dumps(row), flush=True)
    (HERE / "text_exports.json").write_text(json.dumps(rows, indent=1) + "\n")
    print("| setting | export | " + " | ".join(f"{s} steps" for s in STEPS) + " |")
    for row in rows:
        print(f"| {row['setting']} | {row['export']} | " + " | ".join(f"{row[f'{s} steps']:.1e}" for s in STEPS) + " |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6])
    else:
        main()
