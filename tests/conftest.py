"""Shared fixtures: composing conf/ as run.py does, with tiny CPU-sized overrides."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

from ldm_lab.config.schema import register_configs
from tests.helpers import save_tiny_first_stage

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# 12 synthetic images of 32-48 px, 32 px crops, batch 2, on the CPU, quietly.
SMALL_RUN = [
    "data.resolution=32",
    "data.batch_size=2",
    "data.num_val=4",
    "data.num_workers=0",
    "data.source.num_images=12",
    "data.source.min_side=32",
    "data.source.max_side=48",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]

# A tiny KL autoencoder run on 32 px synthetic images: seconds per step on a CPU.
TINY = [
    "model=vae_tiny",
    "model.ema_decay=0.9",
    "model.loss.perceptual_weight=0",
    "model.metrics.lpips=false",
    "model.metrics.rfid=false",
    "disc.ndf=16",
    "disc.n_layers=2",
    *SMALL_RUN,
]

# The tiny UNet on 32 px synthetic images in the latent space of a tiny f4 first stage (8x8 latents);
# model.first_stage is added by the test.
LDM_TINY = [
    "model=unet_tiny",
    "model.ema_decay=0.9",
    "model.scale_lr=false",
    "model.lr=1e-3",
    "sample.num_inference_steps=2",
    *SMALL_RUN,
]


@pytest.fixture
def compose_cfg(tmp_path):
    """compose(overrides) -> the run config, writing outputs and data under tmp_path."""
    register_configs()

    def _compose(overrides=(), tiny=True):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose(
                config_name="config",
                overrides=(TINY if tiny else [])
                + [f"paths.output_dir={tmp_path / 'run'}", f"paths.data_dir={tmp_path / 'data'}", *overrides],
            )

    yield _compose
    GlobalHydra.instance().clear()


@pytest.fixture(autouse=True)
def _seed():
    L.seed_everything(0, verbose=False)
    torch.set_num_threads(2)


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}
TEXT_TINY = ["model=unet_text_tiny", *[o for o in LDM_TINY if not o.startswith(("model=", "data.source."))],
             "data=folder", "data.source.caption_extension=.txt", "data.source.index_workers=0", "data.num_val=4"]


def captioned_folder(root, per_colour: int = 4):
    """Squares of four colours on grey, each with a caption file naming its colour."""
    root.mkdir(parents=True, exist_ok=True)
    for name, rgb in COLOURS.items():
        for i in range(per_colour):
            image = Image.new("RGB", (32, 32), (128, 128, 128))
            image.paste(rgb, (4 + i, 4 + i, 24 + i, 24 + i))
            image.save(root / f"{name}{i}.png")
            (root / f"{name}{i}.txt").write_text(f"a {name} square\n")
    return root


@pytest.fixture
def text_cfg(compose_cfg, tmp_path):
    """compose(overrides) -> a text-conditional run config: the tiny text UNet and scratch encoder on
    :func:`captioned_folder`, a tiny KL first stage."""
    first_stage = save_tiny_first_stage("kl", tmp_path / "kl")
    data = captioned_folder(tmp_path / "images")

    def make(*overrides):
        model = next((o for o in overrides if o.startswith("model=")), TEXT_TINY[0])  # another model may replace it
        return compose_cfg([model, *TEXT_TINY[1:], f"data.source.root={data}", f"model.first_stage={first_stage}",
                            *(o for o in overrides if o != model)], tiny=False)
    return make


@pytest.fixture
def offline_hub(monkeypatch):
    """The Hugging Face hub as a machine without network access sees it, at once (huggingface_hub reads
    HF_HUB_OFFLINE when imported, so setting the variable now would not stop its retries)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
