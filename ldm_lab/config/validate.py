"""Checks of a run's command line and composed config that Hydra's types cannot express (ranges, config
group choices given as numbers, device counts), made before anything is built; each error names the key
and the fix."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from hydra.utils import get_class
from omegaconf import DictConfig

from ldm_lab.core.errors import ConfigError


def check_group_choices(overrides: list[str], conf_dir: Path) -> None:
    """Every ``group=choice`` of the command line names a file of ``conf/<group>/``. (Hydra rejects a
    number, e.g. ``precision=16``, with "Config group override must be a string ... Got int", naming
    neither the key nor the choices; a misspelt string it reports itself.)"""
    for override in overrides:
        group, sep, value = override.lstrip("+~").partition("=")
        folder = conf_dir / group
        if not sep or not folder.is_dir():
            continue
        for choice in value.split(","):
            plain = re.fullmatch(r"[\w.\-]+", choice) is not None
            if plain and choice != "null" and not (folder / f"{choice}.yaml").is_file():
                options = ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))
                raise ConfigError(f"{group}={choice}: conf/{group}/ has no option {choice!r}; choose one of: {options}")


def check_task_options(overrides: list[str], conf_dir: Path) -> None:
    """Each task's options live in its ``conf/task/<task>.yaml``: an option of another task is named with
    the task it belongs to. (Hydra's own message, "use +evaluate.num_samples=5", would add a key nothing reads.)"""
    chosen = [value for key, _, value in (o.partition("=") for o in overrides) if key == "task"]
    task = chosen[-1] if chosen else "train"
    if "," in task:
        return
    owners: dict[str, list[str]] = {}
    files = {path.stem: yaml.safe_load(path.read_text()) or {} for path in sorted((conf_dir / "task").glob("*.yaml"))}
    for name, options in files.items():
        for key in _leaf_keys(options):
            if key != "task":
                owners.setdefault(key, []).append(name)
    for name, options in files.items():  # a task built on another's options (its defaults) takes them too
        for included in (entry for entry in options.get("defaults", []) if entry in files):
            for key in _leaf_keys(files[included]):
                if key != "task":
                    owners[key].append(name)
    for override in overrides:
        key, sep, _ = override.partition("=")
        owner = next((tasks for option, tasks in owners.items()  # the option, a key inside it, or its parent node
                      if f"{key}.".startswith(f"{option}.") or option.startswith(f"{key}.")), None)
        if sep and owner and task not in owner:
            raise ConfigError(f"{key}: an option of task={' or task='.join(owner)} (conf/task/), but this run is "
                              f"task={task}; add task={owner[0]}, or leave {key} out")


# Keys of the latent diffusion model in their old spelling -> today's (CHANGELOG.md)
MOVED_KEYS = {
    "model.unet": "model.denoiser",
    "model.unet_pretrained": "model.denoiser_pretrained",
    **{f"model.{key}": f"model.objective.{key}" for key in ("noise_scheduler", "timestep_density", "snr_gamma", "ddim")},
}


def check_moved_keys(overrides: list[str]) -> None:
    """A key of the command line in an old spelling (:data:`MOVED_KEYS`) is named with today's. (Hydra would say only
    "Key 'noise_scheduler' is not in struct".)"""
    for override in overrides:
        key = override.lstrip("+~").partition("=")[0]
        for old, new in MOVED_KEYS.items():
            if key == old or key.startswith(f"{old}."):
                raise ConfigError(f"{key} is now {new}{key[len(old):]}: the denoiser (model=unet or dit) and what it "
                                  f"learns (model/objective=ddpm or rectified_flow) are config groups of their own")


def _leaf_keys(node: dict, prefix: str = "") -> list[str]:
    return [leaf for key, value in node.items() if key != "defaults"
            for leaf in (_leaf_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"])]


def _at_least(cfg: DictConfig, key: str, low: float, what: str, strict: bool = False) -> None:
    value = cfg
    for part in key.split("."):
        value = value.get(part) if isinstance(value, DictConfig) else None
    if value is None:
        return
    if (value <= low) if strict else (value < low):
        bound = f"above {low}" if strict else f"at least {low}"
        raise ConfigError(f"{key}={value}: must be {bound} ({what})")


def check_config(cfg: DictConfig) -> None:
    """Ranges of the run's counts and the devices it asks for."""
    _at_least(cfg, "data.batch_size", 1, "images per micro-batch")
    _at_least(cfg, "data.num_val", 0, "validation images, or a fraction of the data below 1", strict=True)
    _at_least(cfg, "val_every_n_steps", 1, "optimizer steps between validations and checkpoints")
    _at_least(cfg, "max_steps", 0, "optimizer steps to train; 0 validates and exports only")
    _at_least(cfg, "model.accumulate_grad_batches", 1, "micro-batches per optimizer step")
    _at_least(cfg, "sample.guidance_scale", 0, "classifier-free guidance: 1 is none, 0 the unconditional model")
    if cfg.task == "train":
        check_devices(cfg)


def check_devices(cfg: DictConfig) -> None:
    """More than one device: a machine without a GPU would silently start CPU processes. More than one process
    (devices x nodes): the GAN stages need DDP told about the parameters each optimizer step leaves unused."""
    trainer = cfg.trainer
    devices, nodes = trainer.devices, int(trainer.get("num_nodes", 1))
    accelerator, strategy = str(trainer.accelerator), str(trainer.strategy)
    if not isinstance(devices, int):
        return
    if devices > 1:
        import torch

        gpus = torch.cuda.device_count()
        if accelerator in ("auto", "gpu", "cuda") and devices > gpus:
            where = "this machine has no GPU" if gpus == 0 else f"{gpus} GPUs are visible"
            raise ConfigError(
                f"trainer.devices={devices}, but {where}. Use trainer.devices={max(gpus, 1)}, or for DDP over CPU "
                f"processes say so: trainer.accelerator=cpu trainer.strategy=ddp_find_unused_parameters_true")
    processes = devices * nodes
    if processes > 1 and get_class(cfg.model._target_).adversarial and "find_unused_parameters_true" not in strategy:
        raise ConfigError(
            f"trainer.strategy={strategy} with {processes} processes (trainer.devices={devices} x trainer.num_nodes="
            f"{nodes}): the autoencoder's generator and discriminator steps each leave the other's parameters "
            f"unused, which plain DDP refuses mid-run. Use trainer.strategy=ddp_find_unused_parameters_true")
