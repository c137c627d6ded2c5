"""Prompt adherence on the captioned synthetic data (GenEval's idea, Ghosh et al. 2023: object, count and colour,
here on pictures whose truth is known). A reader network, trained once on fresh renders of
:func:`~ldm_lab.data.synthetic_captions.draw_captioned`, reads back a picture's shape kind, count, shape colour and
background colour; a sample adheres to its prompt when all four are the prompt's. Its embedding also gives the
sample FID of the captioned set (it is trained, as the unlabelled set's feature network, to tell a render from a
spoilt one too). Cached once per (side, steps)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save
from tqdm import tqdm

from ldm_lab.core.atomic import atomic_write
from ldm_lab.data.synthetic_captions import COLOURS, KINDS, NUMBERS, draw_captioned
from ldm_lab.evaluation.synthetic_features import degrade
from ldm_lab.nn.feature_net import FeatureNet

log = logging.getLogger(__name__)

CHOICES = {"kind": KINDS, "count": (1, 2, 3), "colour": tuple(COLOURS), "background": tuple(COLOURS)}
NUM_LOGITS = sum(len(values) for values in CHOICES.values())
VERSION = 1
_COLOUR = "|".join(COLOURS)
_PHRASINGS = (  # the three phrasings of synthetic_captions.describe
    re.compile(rf"^(?P<count>one|two|three) (?P<colour>{_COLOUR}) (?P<kind>\w+?)s? on an? (?P<background>{_COLOUR}) "
               rf"background$"),
    re.compile(rf"^an? (?P<background>{_COLOUR}) background with (?P<count>one|two|three) (?P<colour>{_COLOUR}) "
               rf"(?P<kind>\w+?)s?$"),
    re.compile(rf"^(?P<count>[123]) (?P<colour>{_COLOUR}) (?P<kind>\w+?)s?, (?P<background>{_COLOUR}) background$"),
)


def facts_of(prompt: str) -> torch.Tensor | None:
    """The four facts a prompt of the captioned set states, as ids into :data:`CHOICES` (kind, count, colour,
    background), or None for a prompt in none of its phrasings."""
    for phrasing in _PHRASINGS:
        found = phrasing.match(prompt.strip().lower())
        if found and found["kind"] in KINDS:
            count = int(found["count"]) if found["count"].isdigit() else NUMBERS.index(found["count"]) + 1
            return torch.tensor([KINDS.index(found["kind"]), count - 1, CHOICES["colour"].index(found["colour"]),
                                 CHOICES["background"].index(found["background"])])
    return None


def render(count: int, resolution: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` captioned pictures in [-1, 1] and their facts (N, 4)."""
    images, facts = [], []
    for index in range(count):
        image, captions, _ = draw_captioned(np.random.default_rng([seed, index]), resolution)
        images.append(torch.from_numpy(np.array(image)).permute(2, 0, 1))
        facts.append(facts_of(captions[0]))
    return torch.stack(images).float() / 127.5 - 1, torch.stack(facts)


def read_back(reader: FeatureNet, images: torch.Tensor) -> torch.Tensor:
    """(N, 4) the facts the reader sees in images in [-1, 1]."""
    with torch.no_grad():
        logits = reader.predict(images.float().cpu())[:, :NUM_LOGITS].split([len(v) for v in CHOICES.values()], dim=1)
    return torch.stack([head.argmax(dim=1) for head in logits], dim=1)


def fact_matches(reader: FeatureNet, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """(N, 4) whether each image shows each fact of its prompt (kind, count, colour, background)."""
    wanted = torch.stack([facts_of(prompt) for prompt in prompts])
    return read_back(reader, images) == wanted


def adheres(reader: FeatureNet, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """(N,) whether each image shows all four facts of its prompt."""
    return fact_matches(reader, images, prompts).all(dim=1)


def train_reader(resolution: int, steps: int = 1600, batch_size: int = 64, num_renders: int = 4096,
                 seed: int = 0) -> tuple[FeatureNet, float]:
    """The reader trained with AdamW on ``num_renders`` renders (cross-entropy on each fact; from the last output
    whether a picture is a render or a spoilt one), and the share of 512 unseen renders it reads entirely right."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    images, facts = render(num_renders, resolution, seed)
    net = FeatureNet(NUM_LOGITS + 1, resolution)
    real = torch.arange(batch_size) < batch_size // 2
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    sizes = [len(v) for v in CHOICES.values()]
    for _ in tqdm(range(steps), desc="prompt reader", unit="step"):
        batch = torch.randint(num_renders, (batch_size,), generator=generator)
        pictures = torch.cat([images[batch[real]], degrade(images[batch[~real]], generator)])
        predicted = net.predict(pictures)
        heads = predicted[real, :NUM_LOGITS].split(sizes, dim=1)
        loss = sum(F.cross_entropy(head, facts[batch[real], i]) for i, head in enumerate(heads))
        loss = loss + F.binary_cross_entropy_with_logits(predicted[:, NUM_LOGITS], real.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    net.eval()
    unseen, truth = render(512, resolution, seed + 1)
    return net, float((read_back(net, unseen) == truth).all(dim=1).float().mean())


def load_reader(cache_dir: str | Path, resolution: int, steps: int = 1600) -> tuple[FeatureNet, str]:
    """The cached reader for pictures of ``resolution`` px, trained and saved on first use, and a line that names
    it with its held-out accuracy, for the report."""
    path = Path(cache_dir) / f"synthetic-prompt-reader-v{VERSION}-{resolution}px-{steps}steps.safetensors"
    if path.is_file():
        net = FeatureNet(NUM_LOGITS + 1, resolution)
        with safe_open(path, framework="pt") as file:
            net.load_state_dict({name: file.get_tensor(name) for name in file.keys()})
            accuracy = float(file.metadata()["heldout_accuracy"])
    else:
        log.info("training the captioned synthetic data's prompt reader (%d steps, once; cached at %s)", steps, path)
        net, accuracy = train_reader(resolution, steps)
        weights = save(net.state_dict(), metadata={"heldout_accuracy": f"{accuracy:.4f}"})
        atomic_write(path, lambda file: file.write(weights))
    return net.eval(), f"prompt reader {path.name} (reads all four facts of {accuracy:.1%} of unseen renders)"
