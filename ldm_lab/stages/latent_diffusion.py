"""The latent diffusion stage (LDM, Rombach et al. 2022; LDM-VQ-4, seed 000): a diffusers UNet2DModel
learns to predict the noise added to scaled first-stage latents (DDPM, Ho et al. 2020: ``loss_simple`` =
MSE between the UNet's prediction and the noise at a uniform random timestep).

Unconditional, or class-conditional (``conditioning="class"``): the classes come from the data and are
stored in the model config; the UNet's class embedding (diffusers' ``num_class_embeds`` = K + 1, the last id
the null class) is added to its time embedding, as ADM and DiT condition. LDM's cin256 put one class token
through cross-attention instead: with one key, softmax gives it weight 1, so each attention layer only
adds a class-dependent vector, while the time embedding reaches every residual block's scale and shift,
and costs no attention. Training replaces a label by the null class with probability ``label_dropout``
(classifier-free guidance, Ho & Salimans 2022; ldm_lab/diffusion/guidance.py samples with it).

The first stage is frozen. Latents come from the latent cache (moments stored per image) or are encoded
on the fly; either way ``latent_scale`` (1 / std of the training latents) multiplies them. It is set
once, saved with the checkpoint (a buffer) and never recomputed on resume. An EMA of the UNet (only the
UNet) is updated after every optimizer step and is what validation's ``loss_simple_ema``, the image
logger, sampling and export use.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_snr
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from ldm_lab.config.errors import ConfigError
from ldm_lab.config.speed import optimizer_options
from ldm_lab.diffusion.guidance import class_ids
from ldm_lab.diffusion.sampling import LatentDiffusionModel
from ldm_lab.io.checkpoints import CheckpointError
from ldm_lab.io.export import export_pipeline
from ldm_lab.io.samples import draw_samples, grid_classes
from ldm_lab.io.sources import load_first_stage, load_unet
from ldm_lab.nn.downsampling import downsampling
from ldm_lab.nn.ema import ema_with_warmup
from ldm_lab.nn.frozen_autoencoder import FrozenAutoencoder
from ldm_lab.stages.base import TrainingStage
from ldm_lab.stages.encoding import encode_latent_cache, ranks_of

log = logging.getLogger(__name__)

CONDITIONINGS = (None, "class")  # model.conditioning


class LatentDiffusionStage(TrainingStage):
    """``lr`` is per sample when ``scale_lr`` is set: the optimizer gets lr x batch x accumulation x
    devices (LDM's main.py: 2e-6 x 48 = 9.6e-5 for LDM-VQ-4); otherwise it is used as given.
    ``latent_scale``: None measures 1 / std of the training latents (LDM's scale_by_std); a number is
    used as given (LDM-VQ-4: 1.0). ``ddim``: the DDIM spacing of sampling and the export (LDM's
    DDIMSampler: ``steps_offset`` 1, ``set_alpha_to_one`` false). ``unet_pretrained``: start from these
    UNet weights (:func:`load_pretrained_unet`); the EMA starts from them too. ``snr_gamma``: min-SNR-gamma
    weighting of the training loss (Hang et al. 2023), min(SNR, gamma) / SNR for epsilon and
    min(SNR, gamma) / (SNR + 1) for v-prediction; validation reports the unweighted loss_simple.
    ``timestep_density``: how training draws timesteps, diffusers' ``compute_density_for_timestep_sampling``
    arguments: ``weighting_scheme`` uniform (LDM) or logit_normal (Esser et al. 2024: the timestep is
    1000 x sigmoid(N(logit_mean, logit_std))); validation always draws them uniformly. ``conditioning``: None
    or "class", with ``class_names`` (filled from the data, :meth:`config_from_data`) and ``label_dropout``."""

    monitor, monitor_mode = "val/loss_simple_ema", "min"
    description = "a latent diffusion UNet (model=unet or unet_tiny)"
    produces = "latent_diffusion"

    def __init__(
        self,
        unet: functools.partial,
        noise_scheduler: SchedulerMixin,
        first_stage: str | dict | None,
        optimizer: functools.partial,
        scheduler: functools.partial,
        lr: float,
        max_steps: int,
        scale_lr: bool = True,
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = None,
        gradient_checkpointing: bool = False,
        ema_decay: float | None = 0.9999,
        latent_cache: bool = True,
        latent_scale: float | None = None,
        ddim: dict | None = None,
        unet_pretrained: str | None = None,
        snr_gamma: float | None = None,
        timestep_density: dict | None = None,
        conditioning: str | None = None,
        class_names: list[str] | None = None,
        label_dropout: float = 0.1,
        max_consecutive_nonfinite: int = 5,
        seed: int = 0,
    ):
        super().__init__(max_steps, accumulate_grad_batches, gradient_clip_val, max_consecutive_nonfinite, seed)
        config = noise_scheduler.config
        if config.get("rescale_betas_zero_snr") and config.prediction_type == "epsilon":
            raise ConfigError("model.noise_scheduler.rescale_betas_zero_snr=true makes the last timestep pure noise, "
                              "where the noise is no target to learn (Lin et al. 2024): set "
                              "model.noise_scheduler.prediction_type=v_prediction")
        self.timestep_density = dict(timestep_density or {"weighting_scheme": "uniform"})
        if self.timestep_density["weighting_scheme"] not in ("uniform", "logit_normal"):
            raise ConfigError(f"model.timestep_density.weighting_scheme={self.timestep_density['weighting_scheme']}: "
                              f"use uniform (LDM) or logit_normal")
        if first_stage is None:
            raise ConfigError("model=unet trains in the latent space of a first stage: set model.first_stage to a "
                              "first-stage checkpoint (.ckpt) or exported folder, e.g. from python run.py "
                              "experiment=quickstart: model.first_stage=outputs/<date>/<time>/checkpoints/last.ckpt")
        if isinstance(first_stage, Mapping):  # a checkpoint's description: the architecture, weights follow
            self.first_stage = FrozenAutoencoder.from_description(OmegaConf.to_container(OmegaConf.create(first_stage)))
            self.first_stage_source = None
        else:
            self.first_stage = load_first_stage(first_stage)
            self.first_stage_source = str(first_stage)  # recorded in checkpoints
        self.class_names = _class_names(conditioning, class_names)
        if not 0 <= label_dropout < 1:
            raise ConfigError(f"model.label_dropout={label_dropout}: the share of labels dropped in training, "
                              f"in [0, 1)")
        self.label_dropout = label_dropout
        channels = self.first_stage.latent_channels
        # a class-conditional UNet embeds K classes and the null class
        classes = {} if self.class_names is None else {"num_class_embeds": len(self.class_names) + 1}
        self.unet: nn.Module = unet(in_channels=channels, out_channels=channels, **classes)
        if unet_pretrained is not None:
            load_pretrained_unet(self.unet, unet_pretrained)
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.noise_scheduler = noise_scheduler
        # Set once (given, or measured at the start of training), then restored from checkpoints.
        self.register_buffer("latent_scale", torch.tensor(float("nan") if latent_scale is None else latent_scale))
        self.ddim = dict(ddim or {})
        self.ema = ema_with_warmup(self.unet, ema_decay) if ema_decay else None
        self.make_optimizer, self.make_scheduler = optimizer, scheduler
        self.lr, self.scale_lr = lr, scale_lr
        self.latent_cache = latent_cache
        self.snr_gamma = snr_gamma
        self._val_sums: torch.Tensor | None = None
        self._latent_cache_root: str | Path | None = None  # attach_data: where setup fills the cache

    # ----------------------------------------------------------------------------- what the tasks ask
    @classmethod
    def downsample_factor_of(cls, model: DictConfig) -> int:
        """The UNet's downsampling times its first stage's (when ``model.first_stage`` is set; without one,
        image sides then fit any first stage up to the UNet's step)."""
        first_stage = load_first_stage(model.first_stage).downsample_factor if model.first_stage else 1
        return first_stage * downsampling(model.unet)

    @classmethod
    def config_from_data(cls, model: DictConfig, datamodule) -> DictConfig:
        """A class-conditional model's ``class_names`` are its data's (indexed here), so the checkpoint's config
        rebuilds it; given ones must be the data's."""
        if model.get("conditioning") != "class":
            return model
        datamodule.prepare_data()
        datamodule.setup_index()
        names = datamodule.class_names
        if names is None:
            raise ConfigError(f"model.conditioning=class learns the classes of its data, and {datamodule.source.name} "
                              f"has none: label it (data=folder data.source.labels=subfolder, a Hugging Face "
                              f"data.source.label_column, or the synthetic data.source.num_classes=4), or set "
                              f"model.conditioning=null")
        if model.get("class_names") is not None and list(model.class_names) != names:
            raise ConfigError(f"model.class_names={list(model.class_names)} are not the data's classes {names}: leave "
                              f"model.class_names unset (it is filled from the data)")
        with open_dict(model):
            model.class_names = names
        return model

    @classmethod
    def inference_config(cls, model: dict, state: dict) -> dict:
        """The first stage rebuilt from the checkpoint's description (its weights are in the state dict), not its
        source; the ``preview`` sampling options older checkpoints hold are the image logger's now (issue 22)."""
        model["first_stage"] = state["first_stage"]
        model.pop("preview", None)
        return model

    @classmethod
    def planning_config(cls, model: DictConfig, random_first_stage: Callable[[], dict]) -> DictConfig:
        """An unscaled learning rate (its value takes no memory; scaling it needs a datamodule), a latent
        scale of 1, without a first stage a random one, and a class-conditional model's classes, which come from
        the data, as 1000 stand-ins (the class embedding is a few MB at most)."""
        with open_dict(model):
            model.scale_lr = False
            model.latent_scale = model.latent_scale or 1.0
            if model.first_stage is None:
                model.first_stage = random_first_stage()
            if model.get("conditioning") == "class" and not model.get("class_names"):
                model.class_names = [str(i) for i in range(1000)]
        return model

    def planning_batch(self, batch_size: int, side: int) -> dict[str, torch.Tensor]:
        """Pixels, or with the latent cache the first stage's moments, as training reads them."""
        if not self.latent_cache:
            return super().planning_batch(batch_size, side)
        first = self.first_stage
        channels = first.latent_channels * (2 if first.kind == "kl" else 1)
        latent_side = side // first.downsample_factor
        batch = {"latents": torch.randn(batch_size, channels, latent_side, latent_side)}
        if self.class_names is not None:
            batch["class_labels"] = torch.randint(len(self.class_names), (batch_size,))
        return batch

    def check_resume(self, checkpoint: dict, path: str | Path) -> None:
        """Also refused: a checkpoint trained in the latent space of another first stage, whose weights and
        latent scale belong to those latents."""
        super().check_resume(checkpoint, path)
        trained_classes = checkpoint["ldm_lab"]["config"]["model"].get("class_names")
        if trained_classes != self.class_names:
            raise ConfigError(f"ckpt_path={path} was trained on the classes {_describe(trained_classes)}, and this "
                              f"run's data has {_describe(self.class_names)}: resume with the data it was trained "
                              f"on, or start a new run (without ckpt_path) for these classes")
        prefix = "first_stage."
        saved = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
        current = self.first_stage.state_dict()
        same = saved.keys() == current.keys() and all(
            saved[k].shape == v.shape and torch.equal(saved[k], v.cpu()) for k, v in current.items())
        if not same:
            trained_with = checkpoint["ldm_lab"].get("first_stage_source", "a first stage whose source was not recorded")
            raise CheckpointError(
                f"ckpt_path={path} was trained in the latent space of model.first_stage={trained_with}, but this run "
                f"gives model.first_stage={self.first_stage_source}, whose weights differ: its latents and latent "
                f"scale would not match the UNet. Resume with model.first_stage={trained_with}, or start a new run "
                f"(without ckpt_path) for the new first stage")

    def attach_data(self, datamodule, latent_cache_root: str | Path) -> None:
        """With the latent cache, where it lives: the trainer's processes fill it together in :meth:`setup`."""
        self._latent_cache_root = latent_cache_root if self.latent_cache else None

    def setup(self, stage: str) -> None:
        """Once every process has started (the first trainer call): the latent cache encoded, each process its
        share on its own device (ldm_lab/stages/encoding.py), unless the datamodule reads it already."""
        datamodule = self.trainer.datamodule
        if self._latent_cache_root is None or datamodule is None or datamodule.latent_keys is not None:
            return
        strategy = self.trainer.strategy
        encode_latent_cache(self.first_stage, datamodule, self._latent_cache_root, strategy.root_device,
                            ranks_of(strategy))

    def encode_latent_cache(self, datamodule, latent_cache_root: str | Path) -> Path:
        encode_latent_cache(self.first_stage, datamodule, latent_cache_root)
        return datamodule.latent_cache.dir

    def export(self, out_dir: Path, datamodule: Callable[[], object]) -> Path:
        """An ``LDMPipeline`` folder of the evaluation UNet and the sampling scheduler (no data needed)."""
        return export_pipeline(self.sampling_model(), out_dir)

    def after_training(self, output_dir: Path, datamodule, sample_options: DictConfig) -> None:
        """A grid of ``sample.*`` samples at the leftover bucket's resolution, on the GPU when there is one."""
        self.to("cpu")
        grid = draw_samples(sample_options, self.sampling_model(), output_dir / "samples", datamodule.leftover_resolution)
        log.info("sample grid: %s", grid)

    def sampling_model(self) -> LatentDiffusionModel:
        """The parts sampling needs: the evaluation UNet, the first stage, the latent scale, the sampling scheduler."""
        return LatentDiffusionModel(self.eval_unet, self.first_stage, float(self.latent_scale), self.sampling_scheduler,
                                    self.class_names)

    # ----------------------------------------------------------------------------- properties
    @property
    def downsample_factor(self) -> int:
        """Pixels per latent of the first stage, times the UNet's own downsampling: image sides must divide by it."""
        return self.first_stage.downsample_factor * downsampling(self.unet.config)

    @property
    def trained_network(self) -> nn.Module:
        return self.unet

    @property
    def sampling_scheduler(self) -> DDIMScheduler:
        """The training betas with the DDIM spacing ``ddim``: what sampling uses and the export holds."""
        return DDIMScheduler.from_config(self.noise_scheduler.config, **self.ddim)

    @property
    def eval_unet(self) -> nn.Module:
        """The weights validation's loss_simple_ema, image logging, sampling and export use: the EMA when on."""
        return self.ema.module if self.ema is not None else self.unet

    # ----------------------------------------------------------------------------- optimizers
    def configure_optimizers(self):
        lr = self.lr
        if self.scale_lr:
            batch_size, devices = self.trainer.datamodule.batch_size, self.trainer.world_size
            lr = self.lr * batch_size * self.accumulate_grad_batches * devices
            log.info("learning rate %.3g = %.3g (model.lr) x batch %d x accumulation %d x devices %d", lr, self.lr,
                     batch_size, self.accumulate_grad_batches, devices)
        optimizer = self.make_optimizer(self.unet.parameters(), lr=lr,
                                        **optimizer_options(self.make_optimizer, self.fused_optimizer))
        return [optimizer], [self.make_scheduler(optimizer)]

    # ----------------------------------------------------------------------------- latents
    def on_fit_start(self) -> None:
        super().on_fit_start()
        self._ensure_latent_scale()

    def on_validation_start(self) -> None:
        self._ensure_latent_scale()

    def _ensure_latent_scale(self, num_batches: int = 4) -> None:
        if not math.isnan(self.latent_scale.item()):
            return  # set before, or restored from a checkpoint: never recomputed
        datamodule = self.trainer.datamodule
        if datamodule.latent_scale is not None:
            scale, where = datamodule.latent_scale, "the latent cache"
        else:  # encoding on the fly: measure on the first training batches
            scale = self.first_stage.measure_scale(itertools.islice(datamodule.train_dataloader(), num_batches))
            where = f"{num_batches} training batches"
        scale = float(self.trainer.strategy.broadcast(scale))
        self.latent_scale.fill_(scale)
        log.info("latent scale 1/std = %.5f (from %s)", scale, where)

    def latents(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None) -> torch.Tensor:
        """Scaled latents of a batch: cached moments, or pixels encoded now; KL latents are drawn from the posterior."""
        if "latents" in batch:
            moments = batch["latents"]
        else:
            moments = self.first_stage.moments(self.memory_format(batch["pixel_values"]))
        return self.memory_format(self.first_stage.sample(moments, generator) * self.latent_scale)

    # ----------------------------------------------------------------------------- the objective
    def loss_simple(self, unet: nn.Module, latents: torch.Tensor, generator: torch.Generator,
                    training: bool = False, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """MSE between the UNet's prediction (of images of ``class_labels``, for a class-conditional model) and
        its target (the noise for epsilon prediction) at uniform timesteps; ``training``: timesteps drawn from
        ``timestep_density`` and each image's MSE times its timestep's min-SNR weight, when ``snr_gamma`` is set."""
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        num_train_timesteps = self.noise_scheduler.config.num_train_timesteps
        if training and self.timestep_density["weighting_scheme"] != "uniform":
            density = compute_density_for_timestep_sampling(batch_size=len(latents), device=latents.device,
                                                            generator=generator, **self.timestep_density)
            timesteps = (density * num_train_timesteps).long().clamp(max=num_train_timesteps - 1)
        else:
            timesteps = torch.randint(0, num_train_timesteps, (len(latents),), generator=generator,
                                      device=latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, class_labels=class_labels).sample
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        if not training or self.snr_gamma is None:
            return F.mse_loss(prediction.float(), target.float())
        snr = compute_snr(self.noise_scheduler, timesteps)
        weight = snr.clamp(max=self.snr_gamma) / (snr + 1 if self.noise_scheduler.config.prediction_type == "v_prediction"
                                                   else snr)
        return (F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3)) * weight).mean()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        generator = self.step_generator(self.device)
        latents = self.latents(batch, generator)
        loss = self.loss_simple(self.unet, latents, generator, training=True,
                                class_labels=self._dropped_labels(batch, generator))
        name = "loss_simple" if self.snr_gamma is None else "loss_min_snr"
        if self.timestep_density["weighting_scheme"] != "uniform":
            name += "_" + self.timestep_density["weighting_scheme"]  # not LDM's loss_simple: other timesteps
        self.backward_and_step([loss], {name: loss.detach()})

    def class_labels(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """A class-conditional model's labels of a batch (None for an unconditional model)."""
        if self.class_names is None:
            return None
        if "class_labels" not in batch:
            raise ConfigError("a class-conditional model got a batch without class labels: train it on the labelled "
                              "data it was built for")
        return batch["class_labels"]

    def _dropped_labels(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor | None:
        """The batch's labels, each replaced by the null class with probability ``label_dropout``."""
        labels = self.class_labels(batch)
        if labels is None or not self.label_dropout:
            return labels
        dropped = torch.rand(labels.shape, generator=generator, device=labels.device) < self.label_dropout
        return torch.where(dropped, len(self.class_names), labels)

    def on_optimizer_step(self) -> None:
        if self.ema is not None:
            self.ema.update_parameters(self.unet)

    # ----------------------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(3, dtype=torch.float64, device=self.device)

    def _val_generator(self, batch_idx: int, purpose: int) -> torch.Generator:
        """The same randomness for a validation batch at every validation, so losses compare over steps;
        ``purpose`` keeps the posterior sample's noise apart from the diffusion noise."""
        seed = np.random.SeedSequence([self.seed, batch_idx, purpose]).generate_state(1)[0]
        return torch.Generator(self.device).manual_seed(int(seed))

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        latents, labels = self.latents(batch, self._val_generator(batch_idx, 0)), self.class_labels(batch)
        loss = self.loss_simple(self.unet, latents, self._val_generator(batch_idx, 1), class_labels=labels)
        loss_ema = self.loss_simple(self.eval_unet, latents, self._val_generator(batch_idx, 1), class_labels=labels)
        self._val_sums += torch.stack([loss.double(), loss_ema.double(), torch.ones((), device=self.device)]) * len(latents)

    def on_validation_epoch_end(self) -> None:
        loss, loss_ema, count = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum").tolist()
        self.log_validation({"loss_simple": torch.tensor(loss / count), "loss_simple_ema": torch.tensor(loss_ema / count)})

    # ----------------------------------------------------------------------------- sampling
    def preview_images(self, datamodule, num_images: int, sampling: Mapping) -> tuple[str, torch.Tensor, int]:
        """For :class:`~ldm_lab.callbacks.image_logger.ImageLogger`: samples from the same noise every time,
        with the EMA weights, drawn as ``sampling`` (the run's ``sample.*``) says; a class-conditional model's
        grid has a row per class (:func:`~ldm_lab.io.samples.grid_classes`) of ``num_images`` // rows images."""
        height, width = datamodule.leftover_resolution
        generator = torch.Generator().manual_seed(self.seed)
        options = {key: sampling[key] for key in ("sampler", "num_inference_steps", "eta", "guidance_scale")
                   if key in sampling}
        model = self.sampling_model()
        if self.class_names is None:
            options.pop("guidance_scale", None)
            images = model.generate(num_images, height, width, generator=generator, **options)
            return "samples", images, math.ceil(math.sqrt(num_images))
        rows = grid_classes(class_ids(sampling.get("class_labels"), self.class_names))
        per_row = max(1, num_images // len(rows))
        labels = torch.tensor(rows).repeat_interleave(per_row)
        images = model.generate(len(labels), height, width, generator=generator, class_labels=labels, **options)
        return "samples", images, per_row

    # ----------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["ldm_lab"]["first_stage"] = self.first_stage.describe()  # rebuilds it without its source
        checkpoint["ldm_lab"]["first_stage_source"] = self.first_stage_source  # named when a resume does not match


def _class_names(conditioning: str | None, class_names: list[str] | None) -> list[str] | None:
    if conditioning not in CONDITIONINGS:
        raise ConfigError(f"model.conditioning={conditioning}: null (unconditional) or class")
    if conditioning is None:
        return None
    if not class_names:
        raise ConfigError("model.conditioning=class needs the classes, which training fills in from the data "
                          "(model.class_names): train on labelled data, or build the stage with class_names")
    return [str(name) for name in class_names]


def _describe(class_names: list[str] | None) -> str:
    if class_names is None:
        return "none (unconditional)"
    return f"{len(class_names)} [{', '.join(class_names[:8])}{', ...' if len(class_names) > 8 else ''}]"


def load_pretrained_unet(unet: nn.Module, source: str) -> None:
    """Copy into ``unet`` the weights of a UNet source (ldm_lab/io/sources.py: a latent diffusion training
    checkpoint, a UNet2DModel or LDMPipeline folder, an original LDM checkpoint); the architectures must be the same."""
    pretrained = load_unet(source, "model.unet_pretrained")
    keys = ("block_out_channels", "layers_per_block", "down_block_types", "attention_head_dim", "in_channels",
            "num_class_embeds")
    differ = {k: (_plain(pretrained.config[k]), _plain(unet.config[k])) for k in keys
              if _plain(pretrained.config[k]) != _plain(unet.config[k])}
    if differ:
        raise ConfigError(f"model.unet_pretrained={source} is another UNet than model.unet: "
                          + "; ".join(f"{k} {a} there, {b} here" for k, (a, b) in differ.items())
                          + ". Set model.unet.* to its config")
    unet.load_state_dict(pretrained.state_dict())
    log.info("UNet weights from %s", source)


def _plain(value):
    """A config value comparable across diffusers versions: lists and tuples as lists."""
    return list(value) if isinstance(value, list | tuple) else value
