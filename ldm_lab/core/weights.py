"""Pretrained weights the lab cannot download at run time: where they are looked for, and what to
say when they are missing.

Each file is looked up at an explicit path (``paths.weights.<name>``) first, then in
``$TORCH_HOME/hub/checkpoints`` where torchvision and torch-fidelity themselves cache it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm_lab.core.errors import ConfigError, MissingPathError


@dataclass(frozen=True)
class WeightFile:
    filename: str
    url: str
    used_for: str
    config_key: str


WEIGHT_FILES = {
    "vgg16": WeightFile(
        filename="vgg16-397923af.pth",
        url="https://download.pytorch.org/models/vgg16-397923af.pth",
        used_for="the LPIPS loss and metric (torchvision's VGG16 backbone)",
        config_key="paths.weights.vgg16",
    ),
    "inception": WeightFile(
        filename="weights-inception-2015-12-05-6726825d.pth",
        url="https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
        "weights-inception-2015-12-05-6726825d.pth",
        used_for="rFID / FID (torch-fidelity's Inception-v3, the network behind published FIDs)",
        config_key="paths.weights.inception",
    ),
}


class MissingWeightsError(MissingPathError):
    """A weight file is neither at its configured path nor in the torch hub cache."""


def hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def find_weights(name: str, explicit: str | os.PathLike | None = None) -> Path | None:
    """The path of weight file ``name`` if present, else None."""
    spec = WEIGHT_FILES[name]
    if explicit:
        path = Path(explicit).expanduser()
        return path if path.is_file() else None
    path = hub_checkpoint_dir() / spec.filename
    return path if path.is_file() else None


def require_weights(name: str, explicit: str | os.PathLike | None = None) -> Path:
    """The path of weight file ``name``; raises MissingWeightsError saying how to get it (the caller, who knows
    the task, adds how to do without)."""
    path = find_weights(name, explicit)
    if path is None:
        raise MissingWeightsError(missing_message(name, explicit))
    return path


def missing_message(name: str, explicit: str | os.PathLike | None = None, switch_off: str | None = None) -> str:
    """What is missing, where it was looked for, and how to get it; ``switch_off``: the keys that do without it
    in the task at hand, when there are any."""
    spec = WEIGHT_FILES[name]
    where = f"at {spec.config_key}={explicit}" if explicit else f"in {hub_checkpoint_dir()}"
    without = f", or do without it: {switch_off}" if switch_off else ""
    return (
        f"{spec.filename} was not found {where}; it is needed for {spec.used_for}. "
        f"Get it with `make weights` (downloads {spec.url} into $TORCH_HOME/hub/checkpoints), "
        f"or point {spec.config_key}=/path/to/{spec.filename} at a copy{without}."
    )


def download_all() -> None:
    """Fetch every weight file into the torch hub cache (`make weights`)."""
    target = hub_checkpoint_dir()
    target.mkdir(parents=True, exist_ok=True)
    for spec in WEIGHT_FILES.values():
        path = target / spec.filename
        if path.is_file():
            print(f"present: {path}")
            continue
        print(f"downloading {spec.url} -> {path}")
        try:
            torch.hub.download_url_to_file(spec.url, str(path))
        except OSError as error:
            raise SystemExit(
                f"could not download {spec.url} ({error}). Copy {spec.filename} from a machine "
                f"with internet access into {target}."
            ) from error


if __name__ == "__main__":
    download_all()


def offline_config(name: str, known: Mapping[str, Callable[[], object]], key: str):
    """The transformers config of model ``name`` where a local copy or the hub cache has it, else the lab's copy for
    the ``known`` ids its configs name: what task=plan builds a random stand-in from offline (``key``: the config
    key that names the model)."""
    from transformers import AutoConfig  # only the language and image encoders need transformers

    try:
        return AutoConfig.from_pretrained(name, local_files_only=True)
    except OSError:
        if name not in known:
            raise ConfigError(f"task=plan needs the architecture of {key}={name}, which cannot be read offline: point "
                              f"it at a local copy") from None
        return known[name]()
