"""Build a diffusers model from config, or load it from a local folder or hub id."""

from __future__ import annotations

import functools
from pathlib import Path

from torch import nn

from ldm_lab.io.convert import converted


def build_or_load(factory: functools.partial, pretrained: str | None, subfolder: str | None = None) -> nn.Module:
    """``factory()`` (a diffusers model class partially applied to its config) or, when ``pretrained``
    is given, ``factory.func.from_pretrained(pretrained)``: the pretrained folder's own config wins. A
    checkpoint file of the original code (LDM's vq-f4 model.ckpt, SD's VAE .safetensors) is converted first."""
    if pretrained is None:
        return factory()
    if Path(pretrained).is_file():
        pretrained, subfolder = converted(pretrained, "first_stage"), None
    try:
        return factory.func.from_pretrained(pretrained, subfolder=subfolder)
    except (OSError, ValueError) as error:
        raise RuntimeError(
            f"could not load model.pretrained={pretrained!r} (subfolder={subfolder!r}) as a "
            f"{factory.func.__name__}: {error}\nWithout network access, download the model where you "
            f"have one (`hf download {pretrained} --local-dir ./{str(pretrained).split('/')[-1]}`), "
            f"copy the folder here and pass model.pretrained=/path/to/that/folder."
        ) from error
