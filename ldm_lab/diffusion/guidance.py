"""Class conditioning at sampling time: which classes to draw, and classifier-free guidance (Ho & Salimans
2022) as a wrapper of the denoiser. A class-conditional model of K classes also knows a null class, id K,
which training puts in place of a label with probability ``model.label_dropout``: its prediction is the
unconditional one. Guidance combines both, uncond + s (cond - uncond), on every latent channel (DiT's code
guided 3 of 4, its issue 41); s = 1 is the conditional model alone."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ldm_lab.config.errors import ConfigError
from ldm_lab.nn.denoisers import predict as denoiser_predict

NULL_CLASS = "null_class"  # sample.class_labels: the null class, unconditional samples of a conditional model

Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (latents, timestep) -> the network's prediction


def class_ids(requested: str | int | Sequence[str | int] | None, class_names: Sequence[str]) -> list[int]:
    """``sample.class_labels`` as class ids: None is every class; each entry a class name, an id, or
    ``null_class`` (the null id K, unconditional samples)."""
    if requested is None:
        return list(range(len(class_names)))
    entries = [requested] if isinstance(requested, str | int) else list(requested)
    position = {name: i for i, name in enumerate(class_names)}
    ids = []
    for entry in entries:
        if entry == NULL_CLASS:
            ids.append(len(class_names))
        elif isinstance(entry, int) and 0 <= entry < len(class_names):
            ids.append(entry)
        elif str(entry) in position:
            ids.append(position[str(entry)])
        else:
            shown = ", ".join(class_names[:20]) + (", ..." if len(class_names) > 20 else "")
            raise ConfigError(f"sample.class_labels: {entry!r} is no class of this model: give names ({shown}), ids "
                              f"0-{len(class_names) - 1}, {NULL_CLASS} (unconditional samples) or null (every class)")
    return ids


def guided(denoiser: nn.Module, class_labels: torch.Tensor | None = None, guidance_scale: float = 1.0,
           null_class: int | None = None) -> Predict:
    """The prediction function sampling steps with: the unconditional denoiser's; with ``class_labels`` (N,) the
    conditional one's; and with a ``guidance_scale`` other than 1 both, in one doubled batch (conditional
    first, then ``null_class``), combined as uncond + s (cond - uncond)."""
    if class_labels is None or guidance_scale == 1:
        return lambda latents, t: denoiser_predict(denoiser, latents, t, class_labels)
    if null_class is None:
        raise ConfigError("guidance needs the model's null class: a model trained with model.conditioning=class")
    both = torch.cat([class_labels, torch.full_like(class_labels, null_class)])

    def predict(latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        conditional, unconditional = denoiser_predict(denoiser, torch.cat([latents, latents]), t, both).chunk(2)
        return unconditional + guidance_scale * (conditional - unconditional)

    return predict
