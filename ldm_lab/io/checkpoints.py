"""Training checkpoints: written atomically, read with errors that name the file and the fix, and
checked before a run resumes from one (the stage it holds, its first stage, finite weights), so a
damaged or mismatched checkpoint stops the run instead of training on silently."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ldm_lab.core.atomic import atomic_write
from ldm_lab.core.errors import ConfigError


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used as asked; the message names the file and what to do."""


# Modules that moved (CHANGELOG.md): checkpoints store the ``_target_`` paths of their config, and those written
# before a move name the old module. Read, they name the new one.
MOVED_MODULES = {
    "ldm_lab.metrics": "ldm_lab.evaluation.metrics",
}


def current_targets(config: Any) -> Any:
    """``config`` (nested dicts and lists) with each ``_target_`` in a moved module renamed to where it is now."""
    if isinstance(config, list):
        return [current_targets(value) for value in config]
    if not isinstance(config, dict):
        return config
    config = {key: current_targets(value) for key, value in config.items()}
    target = config.get("_target_")
    if isinstance(target, str):
        module, _, name = target.rpartition(".")
        config["_target_"] = f"{MOVED_MODULES.get(module, module)}.{name}"
    return config


# Keys the latent diffusion stage had before the denoiser and the objective became config groups (CHANGELOG.md):
# its config's model.unet is model.denoiser, model.unet_pretrained model.denoiser_pretrained, the DDPM keys went
# into model.objective; its weights under unet.* are under denoiser.*.
LDM_STAGE = "ldm_lab.stages.latent_diffusion.LatentDiffusionStage"
DDPM_KEYS = ("noise_scheduler", "timestep_density", "snr_gamma", "ddim")


def current_layout(checkpoint: dict) -> dict:
    """A latent diffusion checkpoint of the old layout (model.unet, DDPM keys in model) in today's."""
    model = checkpoint["ldm_lab"]["config"]["model"]
    if model.get("_target_") != LDM_STAGE or "unet" not in model:
        return checkpoint
    model["denoiser"] = model.pop("unet")
    model["denoiser_pretrained"] = model.pop("unet_pretrained", None)
    model["objective"] = {"_target_": "ldm_lab.diffusion.objectives.DDPM",
                          **{key: model.pop(key) for key in DDPM_KEYS if key in model}}
    checkpoint["state_dict"] = {("denoiser." + key[len("unet."):] if key.startswith("unet.") else key): value
                                for key, value in checkpoint["state_dict"].items()}
    return checkpoint


def nonfinite_tensors(tensors: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors of ``tensors`` holding a NaN or an infinity."""
    return [name for name, tensor in tensors.items()
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all()]


def read_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict:
    """A lab training checkpoint on the CPU, refusing empty, unreadable or foreign files and non-finite weights,
    its config's ``_target_`` paths and layout made current (:func:`current_targets`, :func:`current_layout`). ``mmap``: tensors are read from
    disk when touched (cheap checks before the real load)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): its write never finished. "
                              f"Use another checkpoint of the run (best.ckpt, nonfinite.ckpt) or start afresh")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as error:  # zeroed, truncated, or not a torch file at all
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(error).__name__}: {reason}): it is damaged "
                              f"(a partial copy, a full disk) or not a checkpoint. Use another checkpoint of the run "
                              f"(best.ckpt) or start afresh") from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "ldm_lab" not in checkpoint:
        raise CheckpointError(f"{path} is not an ldm_lab training checkpoint (no state_dict / ldm_lab entry): "
                              f"give a checkpoints/*.ckpt file that python run.py wrote")
    damaged = nonfinite_tensors(checkpoint["state_dict"])
    if damaged:
        raise CheckpointError(f"checkpoint {path} holds non-finite weights in {len(damaged)} tensors "
                              f"({', '.join(damaged[:3])}{', ...' if len(damaged) > 3 else ''}): the file is damaged "
                              f"or the run diverged before it was written. Use an earlier checkpoint (best.ckpt)")
    checkpoint["ldm_lab"]["config"] = current_targets(checkpoint["ldm_lab"]["config"])
    return current_layout(checkpoint)


def stage_description(checkpoint: dict) -> str:
    """What a checkpoint holds, in the words of the model option that trains it."""
    target = checkpoint["ldm_lab"]["config"]["model"]["_target_"]
    return get_class(target).description


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O, writing through :func:`~ldm_lab.core.atomic.atomic_write` (Lightning's own
    stages the file in the system's temporary folder, which may be another disk) and reading through
    :func:`read_checkpoint`."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        atomic_write(path, lambda file: torch.save(checkpoint, file))

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        return read_checkpoint(path)


def claim_run_folder(output_dir: str | os.PathLike, checkpoint_dir: str | os.PathLike, ckpt_path: str | None,
                     overwrite: bool) -> None:
    """Refuse to start a run in a folder that already holds one (its best.ckpt and export/ would be
    overwritten), unless it resumes from a checkpoint of that folder or ``overwrite`` is set."""
    output_dir, checkpoint_dir = Path(output_dir), Path(checkpoint_dir)
    held = [p for p in (checkpoint_dir / "last.ckpt", checkpoint_dir / "best.ckpt", output_dir / "export") if p.exists()]
    if not held or overwrite:
        return
    if ckpt_path is not None and Path(ckpt_path).resolve().parent == checkpoint_dir.resolve():
        return  # a resume of this folder's run
    raise ConfigError(
        f"{output_dir} already holds a run ({', '.join(str(p.relative_to(output_dir)) for p in held)}); a new run "
        f"there would overwrite them. Resume it with ckpt_path={checkpoint_dir / 'last.ckpt'}, write elsewhere "
        f"(hydra.run.dir=<another folder>), or replace it with overwrite=true"
    )


def check_resume_kind(checkpoint: dict, path: str | os.PathLike, stage) -> None:
    """Refuse to resume ``stage`` from a checkpoint of another kind of stage."""
    if get_class(checkpoint["ldm_lab"]["config"]["model"]["_target_"]) is not type(stage):
        raise CheckpointError(f"ckpt_path={path} holds {stage_description(checkpoint)}, but this run trains "
                              f"{stage.description}: resume with the model it was trained with (the run's "
                              f".hydra/overrides.yaml lists them), or leave ckpt_path out to start afresh")
