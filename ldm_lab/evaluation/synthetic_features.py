"""The offline feature network of the embedded synthetic data: trained on fresh renders to read back what
:func:`~ldm_lab.data.synthetic.draw_image` drew (gradient colours and direction, shape kinds and colours)
and the picture's 4x4 layout of colour and edge strength; cached once per (side, width, steps, classes). Its
embedding gives the sample FID and precision/recall when Inception's weights are absent (no download needed); for
the set with classes it also tells the class of a picture, which measures a class-conditional model's samples."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save
from tqdm import tqdm

from ldm_lab.core.atomic import atomic_write
from ldm_lab.data.synthetic import NUM_ATTRIBUTES, draw_image
from ldm_lab.nn.feature_net import FeatureNet

log = logging.getLogger(__name__)

MAX_SIDE = 64  # larger pictures are looked at at 64 px
LAYOUT_SIDE = 4  # the layout targets: the picture's colours and edge strength averaged over 4x4 cells
NUM_TARGETS = NUM_ATTRIBUTES + 4 * LAYOUT_SIDE**2
VERSION = 2  # in the cache's file name: a network of an earlier recipe is trained anew


def edge_strength(pixels: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) mean absolute difference to the right and lower neighbours: what blur takes away."""
    dx = F.pad((pixels[..., :, 1:] - pixels[..., :, :-1]).abs(), (0, 1))
    dy = F.pad((pixels[..., 1:, :] - pixels[..., :-1, :]).abs(), (0, 0, 0, 1))
    return (dx + dy).mean(dim=1, keepdim=True)


def render(count: int, resolution: int, seed: int, num_classes: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` square synthetic pictures in [-1, 1] and their targets: what was drawn, the 4x4 colour
    layout and the 4x4 layout of edge strength. With ``num_classes`` picture i is of class i mod ``num_classes``
    (:func:`render_labels`)."""
    images, attributes = [], []
    for index in range(count):
        label = index % num_classes if num_classes else None
        image, drawn = draw_image(np.random.default_rng([seed, index]), resolution, resolution, label, num_classes)
        images.append(torch.from_numpy(np.array(image)).permute(2, 0, 1))
        attributes.append(torch.from_numpy(drawn))
    pixels = torch.stack(images).float() / 127.5 - 1
    layout = F.adaptive_avg_pool2d(torch.cat([pixels, edge_strength(pixels)], dim=1), LAYOUT_SIDE).flatten(1)
    return pixels, torch.cat([torch.stack(attributes), layout], dim=1)


def render_labels(count: int, num_classes: int) -> torch.Tensor:
    """The classes of :func:`render`'s pictures."""
    return torch.arange(count) % num_classes


def class_logits(net: FeatureNet, images: torch.Tensor) -> torch.Tensor:
    """(N, K) class scores of a network trained with ``num_classes`` K (its outputs after the targets and the
    render-or-spoilt logit)."""
    return net.predict(images)[:, NUM_TARGETS + 1:]


def explained_variance(net: FeatureNet, images: torch.Tensor, targets: torch.Tensor) -> float:
    """R^2 of the net's predictions, averaged over the targets: 1 reads everything back, 0 is no better
    than each target's mean."""
    with torch.no_grad():
        predicted = (net.predict(images) * net.target_std + net.target_mean)[:, :NUM_TARGETS]
        error = (predicted - targets).pow(2).mean(dim=0)
    return float((1 - error / targets.var(dim=0, unbiased=False).clamp(min=1e-8)).mean())


def degrade(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each picture spoilt one way, as an undertrained generator spoils them: blurred (down to 1/2, 1/4 or
    1/8 and up again), noisy (std 0.05-0.3), both, or with its colours scaled and shifted."""
    count, _, height, width = images.shape
    kind = torch.randint(4, (count,), generator=generator)
    factor = 2 ** torch.randint(1, 4, (count,), generator=generator)
    out = images.clone()
    for f in (2, 4, 8):
        blurred = ((kind == 0) | (kind == 2)) & (factor == f)
        if blurred.any():
            small = F.interpolate(out[blurred], scale_factor=1 / f, mode="bilinear", antialias=True)
            out[blurred] = F.interpolate(small, size=(height, width), mode="bilinear")
    std = 0.05 + 0.25 * torch.rand(count, 1, 1, 1, generator=generator)
    noisy = ((kind == 1) | (kind == 2)).view(-1, 1, 1, 1)
    out = torch.where(noisy, out + std * torch.randn(out.shape, generator=generator), out)
    gain = 0.6 + 0.8 * torch.rand(count, 3, 1, 1, generator=generator)
    shift = 0.4 * (torch.rand(count, 3, 1, 1, generator=generator) - 0.5)
    return torch.where((kind == 3).view(-1, 1, 1, 1), out * gain + shift, out).clamp(-1, 1)


def train_feature_net(resolution: int = 64, num_features: int = 64, steps: int = 600, batch_size: int = 64,
                      num_renders: int = 4096, seed: int = 0, num_classes: int = 0) -> tuple[FeatureNet, float]:
    """The feature network trained with AdamW on ``num_renders`` fixed renders of ``resolution`` px to
    predict their standardized targets (each weighs the same), from the next output whether a picture is a
    render or a :func:`degrade`-d one, and with ``num_classes`` the renders' classes from the last ones
    (cross-entropy); and its R^2 on 512 other renders."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    images, targets = render(num_renders, resolution, seed, num_classes)
    labels = render_labels(num_renders, num_classes) if num_classes else None
    net = FeatureNet(NUM_TARGETS + 1 + num_classes, resolution, num_features)
    net.target_mean[:NUM_TARGETS] = targets.mean(dim=0)
    net.target_std[:NUM_TARGETS] = targets.std(dim=0).clamp(min=1e-3)
    targets = (targets - net.target_mean[:NUM_TARGETS]) / net.target_std[:NUM_TARGETS]
    real = torch.arange(batch_size) < batch_size // 2
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    for _ in tqdm(range(steps), desc="feature network", unit="step"):
        batch = torch.randint(num_renders, (batch_size,), generator=generator)
        pictures = torch.cat([images[batch[real]], degrade(images[batch[~real]], generator)])
        predicted = net.predict(pictures)
        loss = F.mse_loss(predicted[real, :NUM_TARGETS], targets[batch[real]]) + \
            F.binary_cross_entropy_with_logits(predicted[:, NUM_TARGETS], real.float())
        if labels is not None:
            loss = loss + F.cross_entropy(predicted[real, NUM_TARGETS + 1:], labels[batch[real]])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    net.eval()
    return net, explained_variance(net, *render(512, resolution, seed + 1, num_classes))


def heldout_class_accuracy(net: FeatureNet, resolution: int, num_classes: int, seed: int = 0) -> float:
    """The share of 512 renders unseen in training whose class the network tells."""
    images = render(512, resolution, seed + 1, num_classes)[0]
    with torch.no_grad():
        return float((class_logits(net, images).argmax(dim=1) == render_labels(512, num_classes)).float().mean())


def load_feature_net(cache_dir: str | Path, resolution: int, num_features: int = 64, steps: int = 600,
                     num_classes: int = 0) -> tuple[FeatureNet, str]:
    """The cached feature network for pictures of ``resolution`` px of the set with ``num_classes`` (0: the
    unlabelled set), trained and saved on first use, and a line that names it, with its held-out R^2 (and
    class accuracy), for the report."""
    side = min(resolution, MAX_SIDE)
    classes = f"-{num_classes}classes" if num_classes else ""
    path = Path(cache_dir) / f"synthetic-features-v{VERSION}-{side}px-{num_features}d-{steps}steps{classes}.safetensors"
    if path.is_file():
        net = FeatureNet(NUM_TARGETS + 1 + num_classes, side, num_features)
        with safe_open(path, framework="pt") as file:
            net.load_state_dict({name: file.get_tensor(name) for name in file.keys()})
            heldout = file.metadata()
    else:
        log.info("training the synthetic data's feature network (%d steps, once; cached at %s)", steps, path)
        net, r2 = train_feature_net(side, num_features, steps, num_classes=num_classes)
        heldout = {"heldout_r2": f"{r2:.4f}"}
        if num_classes:
            heldout["heldout_class_accuracy"] = f"{heldout_class_accuracy(net, side, num_classes):.4f}"
        weights = save(net.state_dict(), metadata=heldout)
        atomic_write(path, lambda file: file.write(weights))
    described = f"reads back the drawing with R^2 {float(heldout['heldout_r2']):.3f}"
    if num_classes:
        described += f", tells the class of {float(heldout['heldout_class_accuracy']):.1%} of unseen renders"
    return net.eval(), f"synthetic feature network {path.name} ({described})"
