"""The latent diffusion stage (LDM, Rombach et al. 2022; LDM-VQ-4, seed 000): a denoiser (a diffusers UNet2DModel
or DiTTransformer2DModel, ldm_lab/nn/denoisers.py) learns an objective (DDPM, LDM's: ``loss_simple`` = MSE between
the prediction and the noise at a uniform random timestep; or rectified flow: ldm_lab/diffusion/objectives.py) on
scaled first-stage latents.

Unconditional, or class-conditional (``conditioning="class"``): the classes come from the data and are
stored in the model config; the denoiser's class embedding (K + 1 ids, the last the null class) is added to its
time embedding, as ADM and DiT condition. LDM's cin256 put one class token
through cross-attention instead: with one key, softmax gives it weight 1, so each attention layer only
adds a class-dependent vector, while the time embedding reaches every residual block's scale and shift,
and costs no attention. Training replaces a label by the null class with probability ``label_dropout``
(classifier-free guidance, Ho & Salimans 2022; ldm_lab/diffusion/pipeline.py samples with it).

The first stage is frozen. Latents come from the latent cache (moments stored per image) or are encoded
on the fly; either way ``latent_scale`` (1 / std of the training latents) multiplies them. It is set
once, saved with the checkpoint (a buffer) and never recomputed on resume. An EMA of the denoiser (only the
denoiser) is updated after every optimizer step and is what validation's ``<loss>_ema``, the image logger,
sampling and export use: LDM's fixed decay (``ema_decay``), or with ``posthoc_ema`` EDM2's power-function EMAs at
several widths, snapshotted for the post-hoc choice of the width (task=ema_sweep), the widest driving evaluation.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

from ldm_lab.core.errors import ConfigError
from ldm_lab.data.latent_cache import text_condition
from ldm_lab.diffusion.objectives import DDPM, RectifiedFlow
from ldm_lab.diffusion.pipeline import LatentDiffusionPipeline, encode_prompt, predict
from ldm_lab.diffusion.sampling import assemble
from ldm_lab.io.checkpoints import CheckpointError
from ldm_lab.io.ema_snapshots import DTYPES, FOLDER, SnapshotWriter
from ldm_lab.io.model_sources import load_denoiser, load_first_stage
from ldm_lab.losses import representation as representation_losses
from ldm_lab.losses.representation import RepresentationLoss
from ldm_lab.nn import denoisers
from ldm_lab.nn.ema import ema_with_warmup, power_function_ema
from ldm_lab.nn.frozen_autoencoder import FrozenAutoencoder
from ldm_lab.nn.text_encoders import (
    count_truncated,
    same_tokenizer,
    tokenizer_files,
    tokenizer_of_files,
)
from ldm_lab.nn.token_routing import TokenRouter
from ldm_lab.stages.base import TrainingStage
from ldm_lab.stages.conditioning import Conditioned, class_names_of, describe_classes, text_encoder_of
from ldm_lab.stages.encoding import encode_feature_cache, encode_latent_cache, encode_text_cache, ranks_of
from ldm_lab.stages.speed import optimizer_options

log = logging.getLogger(__name__)


class LatentDiffusionStage(Conditioned, TrainingStage):
    """``lr`` is per sample when ``scale_lr`` is set: the optimizer gets lr x batch x accumulation x
    devices (LDM's main.py: 2e-6 x 48 = 9.6e-5 for LDM-VQ-4); otherwise it is used as given.
    ``objective``: :class:`~ldm_lab.diffusion.objectives.DDPM` or ``RectifiedFlow`` (``model/objective``).
    ``latent_scale``: None measures 1 / std of the training latents (LDM's scale_by_std); a number is
    used as given (LDM-VQ-4: 1.0). ``denoiser_pretrained``: start from these denoiser weights
    (:func:`load_pretrained_denoiser`); the EMA starts from them too. ``conditioning``: None, "class", with
    ``class_names`` (filled from the data, ldm_lab/tasks/model_config.py) and ``label_dropout``, or "text", with
    ``text_encoder`` (``model/text_encoder``: frozen, or trained with the denoiser and under its own EMA) and
    ``caption_dropout`` (the share of captions replaced by the empty prompt, per step); ``text_cache``: a frozen
    encoder's caption embeddings are encoded once, with the latent cache, and read from it. ``posthoc_ema``:
    ``sigma_rels`` (two or more widths, or None: the fixed-decay EMA), ``snapshot_every`` (steps) and
    ``snapshot_dtype`` of the post-hoc EMA (EDM2, Karras et al. 2024). ``representation``: a loss on the denoiser's
    features at ``block``, times ``weight``, added to the objective's (ldm_lab/losses/representation.py: ``loss``
    None, "dispersive", "repa" with the frozen image ``encoder`` and an MLP head ``head_width`` wide, or "sra" with
    the EMA's features at ``teacher_block`` and up to ``interval`` less noise as the target). ``token_routing``: a
    transformer denoiser's training routes ``ratio`` of its tokens around blocks [``start``, ``end``) (TREAD, Krause
    et al. 2025; ldm_lab/nn/token_routing.py)."""

    monitor_mode = "min"
    description = "a latent diffusion model (model=unet, dit, unet_text, dit_text or a tiny variant)"

    def __init__(
        self,
        denoiser: functools.partial,
        objective: DDPM | RectifiedFlow,
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
        denoiser_pretrained: str | None = None,
        conditioning: str | None = None,
        class_names: list[str] | None = None,
        label_dropout: float = 0.1,
        text_encoder: functools.partial | None = None,
        caption_dropout: float = 0.1,
        text_cache: bool = True,
        posthoc_ema: Mapping | None = None,
        representation: Mapping | None = None,
        token_routing: Mapping | None = None,
        max_consecutive_nonfinite: int = 5,
        seed: int = 0,
    ):
        super().__init__(max_steps, accumulate_grad_batches, gradient_clip_val, max_consecutive_nonfinite, seed)
        if first_stage is None:
            raise ConfigError("model=unet (or dit) trains in the latent space of a first stage: set model.first_stage to "
                              "a first-stage checkpoint (.ckpt) or exported folder, e.g. from python run.py "
                              "experiment=quickstart: model.first_stage=outputs/<date>/<time>/checkpoints/last.ckpt")
        if isinstance(first_stage, Mapping):  # a checkpoint's description: the architecture, weights follow
            self.first_stage = FrozenAutoencoder.from_description(OmegaConf.to_container(OmegaConf.create(first_stage)))
            self.first_stage_source = None
        else:
            self.first_stage = load_first_stage(first_stage)
            self.first_stage_source = str(first_stage)  # recorded in checkpoints
        self.class_names = class_names_of(conditioning, class_names)
        if not 0 <= label_dropout < 1:
            raise ConfigError(f"model.label_dropout={label_dropout}: the share of labels dropped in training, "
                              f"in [0, 1)")
        self.label_dropout = label_dropout
        if not 0 <= caption_dropout < 1:
            raise ConfigError(f"model.caption_dropout={caption_dropout}: the share of captions dropped in training, "
                              f"in [0, 1)")
        self.caption_dropout = caption_dropout
        self.conditioning = conditioning
        text = text_encoder_of(conditioning, text_encoder)
        self.tokenizer = None if text is None else text.tokenizer
        self.text_encoder = None if text is None else text.model
        self.text_encoder_trainable = text is not None and text.trainable
        if text is not None and not text.trainable:
            self.text_encoder.requires_grad_(False).eval()
        num_classes = None if self.class_names is None else len(self.class_names)
        self.denoiser = denoisers.build(denoiser, self.first_stage.latent_channels, conditioning, num_classes,
                                        None if text is None else text.width)
        if denoiser_pretrained is not None:
            load_pretrained_denoiser(self.denoiser, denoiser_pretrained)
        if gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()
        self.objective = objective
        # Set once (given, or measured at the start of training), then restored from checkpoints.
        self.register_buffer("latent_scale", torch.tensor(float("nan") if latent_scale is None else latent_scale))
        self.posthoc_ema = _posthoc_options(posthoc_ema, ema_decay)
        self.sigma_rels = self.posthoc_ema["sigma_rels"] if self.posthoc_ema else []
        averages = [functools.partial(power_function_ema, sigma_rel=s) for s in self.sigma_rels] or \
            ([functools.partial(ema_with_warmup, decay=ema_decay)] if ema_decay else [])
        # the evaluation EMA (the fixed-decay one, or the widest power-function one) and the narrower ones
        evaluation, narrower = (averages[-1], averages[:-1]) if averages else (None, [])
        self.ema = evaluation(self.denoiser) if evaluation else None
        self.text_ema = evaluation(self.text_encoder) if evaluation and self.text_encoder_trainable else None
        self.posthoc_emas = nn.ModuleList(average(self.denoiser) for average in narrower)
        self.text_posthoc_emas = nn.ModuleList(average(self.text_encoder) for average in narrower
                                               if self.text_encoder_trainable)
        checked = representation_losses.options(representation)  # after the EMAs' copies: their blocks get no hooks
        self.representation = None if checked is None else \
            RepresentationLoss(checked, self.denoiser, None if self.ema is None else self.ema.module)
        self._router = None if not token_routing or not token_routing.get("ratio") else \
            TokenRouter(self.denoiser, float(token_routing["ratio"]), int(token_routing["start"]), int(token_routing["end"]))
        if self._router and self.representation and self.representation.head is not None \
                and self._router.routes(self.representation.aligned_block):
            start, end = self._router.span
            raise ConfigError(f"model.representation.block={self.representation.block} lies in the blocks [{start}, "
                              f"{end}) that model.token_routing routes tokens around, so in training it sees only the "
                              f"kept tokens, no patch grid to align: align a block before or after them "
                              f"(model.representation.block=transformer_blocks.<i>) or move model.token_routing.start "
                              f"and end")
        self.make_optimizer, self.make_scheduler = optimizer, scheduler
        self.lr, self.scale_lr = lr, scale_lr
        self.latent_cache = latent_cache
        self.caches_text = latent_cache and text_cache and text is not None and not text.trainable
        self._val_sums: torch.Tensor | None = None
        self._latent_cache_root: str | Path | None = None  # attach_data: where setup fills the cache
        self._empty_prompt: dict[str, torch.Tensor] | None = None  # setup: the empty prompt's cached condition
        self._snapshots: SnapshotWriter | None = None  # on_train_start, with the post-hoc EMA

    @property
    def image_encoder(self) -> nn.Module | None:
        """REPA's frozen image encoder (None without REPA)."""
        return None if self.representation is None else self.representation.image_encoder

    def outside_networks(self) -> list[nn.Module]:
        """REPA's image encoder where training runs it: without the latent cache (with it, the feature cache holds
        its outputs and it stays on the CPU)."""
        return [self.image_encoder] if self.image_encoder is not None and not self.latent_cache else []

    # ----------------------------------------------------------------------------- what the tasks ask
    def planning_batch(self, batch_size: int, side: int) -> dict[str, torch.Tensor]:
        """Pixels, or with the latent cache the first stage's moments, as training reads them; a class-conditional
        model's labels; a text-conditional model's captions, of the longest its encoder reads, and with the text
        cache their embeddings (and the empty prompt's, which caption dropout reads); with REPA and the latent cache,
        the feature cache's image features."""
        if self.latent_cache:
            first = self.first_stage
            channels = first.latent_channels * (2 if first.kind == "kl" else 1)
            latent_side = side // first.downsample_factor
            batch = {"latents": torch.randn(batch_size, channels, latent_side, latent_side)}
            if self.image_encoder is not None:
                grid = self.image_encoder.grid(side, side)
                batch["image_features"] = torch.randn(batch_size, self.image_encoder.width, *grid).half()
        else:
            batch = super().planning_batch(batch_size, side)
        if self.class_names is not None:
            batch["class_labels"] = torch.randint(len(self.class_names), (batch_size,))
        if self.conditioning == "text":
            batch["captions"] = [" ".join(["word"] * self.tokenizer.model_max_length)] * batch_size
        if self.caches_text:
            batch.update(encode_prompt(self.tokenizer, self.text_encoder, batch["captions"]))
            self._empty_prompt = {key: value[0] for key, value in batch.items() if key.startswith("encoder_")}
        return batch

    def check_resume(self, checkpoint: dict, path: str | Path) -> None:
        """Also refused: a checkpoint trained in the latent space of another first stage, whose weights and
        latent scale belong to those latents."""
        super().check_resume(checkpoint, path)
        trained_classes = checkpoint["ldm_lab"]["config"]["model"].get("class_names")
        if trained_classes != self.class_names:
            raise ConfigError(f"ckpt_path={path} was trained on the classes {describe_classes(trained_classes)}, and this "
                              f"run's data has {describe_classes(self.class_names)}: resume with the data it was trained "
                              f"on, or start a new run (without ckpt_path) for these classes")
        trained_loss = (checkpoint["ldm_lab"]["config"]["model"].get("representation") or {}).get("loss")
        loss = None if self.representation is None else self.representation.name
        if trained_loss != loss:
            raise ConfigError(f"ckpt_path={path} was trained with model.representation.loss={trained_loss}, this run "
                              f"gives {loss}: resume with model.representation.loss={trained_loss or 'null'}, or start "
                              f"a new run from its weights: model.denoiser_pretrained={path}")
        trained_widths = (checkpoint["ldm_lab"]["config"]["model"].get("posthoc_ema") or {}).get("sigma_rels")
        if sorted(trained_widths or []) != self.sigma_rels:
            raise ConfigError(f"ckpt_path={path} was trained with model.posthoc_ema.sigma_rels={trained_widths}, this "
                              f"run gives {self.sigma_rels or None}: its EMAs go on as they were, so resume with "
                              f"model.posthoc_ema.sigma_rels={trained_widths or 'null'}, or start a new run from its "
                              f"weights: model.denoiser_pretrained={path}")
        if self.tokenizer is not None:
            trained = checkpoint["ldm_lab"].get("text_encoder", {}).get("tokenizer")
            if trained is None or not same_tokenizer(tokenizer_of_files(trained), self.tokenizer):
                raise ConfigError(f"ckpt_path={path} was trained with another tokenizer than this run's "
                                  f"(model.text_encoder.tokenizer): resume in the run's own folder "
                                  f"(hydra.run.dir=<run>, whose tokenizer/ it keeps) or leave "
                                  f"model.text_encoder.tokenizer unset (the checkpoint's is used)")
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
                f"scale would not match the denoiser. Resume with model.first_stage={trained_with}, or start a new run "
                f"(without ckpt_path) for the new first stage")

    def attach_data(self, datamodule, latent_cache_root: str | Path) -> None:
        """With the latent cache, where it lives: the trainer's processes fill it together in :meth:`setup`.
        Aspect-ratio buckets are refused here, before any encoding, for a denoiser of square latents only; captions
        longer than the text encoder's context are counted (it reads their start)."""
        if self.tokenizer is not None and datamodule.captioned:
            captions = [caption for options in datamodule.index.captions for caption in options]
            truncated = count_truncated(self.tokenizer, captions)
            if truncated:
                log.warning("%d of %d captions are longer than the text encoder's %d tokens: it reads their start "
                            "(shorten them, or put what matters first)", truncated, len(captions),
                            self.tokenizer.model_max_length)
        if datamodule.buckets is not None and denoisers.backbone(self.denoiser).square_only:
            raise ConfigError(f"{type(self.denoiser).__name__} denoises square latents only (diffusers' unpatchify is "
                              f"square), and data.buckets makes batches of other shapes: train it with data.buckets=null "
                              f"(square crops of data.resolution), or use model=unet")
        self._latent_cache_root = latent_cache_root if self.latent_cache else None
        if self.caches_text and datamodule.shuffle_caption:
            raise ConfigError("data.shuffle_caption=true changes a caption's text at every step, and the text cache "
                              "encodes each caption once: set model.text_cache=false (the frozen text encoder then "
                              "reads the shuffled captions at every step) or data.shuffle_caption=false")

    def setup(self, stage: str) -> None:
        """Once every process has started (the first trainer call): the latent cache and, for a frozen text encoder,
        the text cache encoded, each process its share on its own device (ldm_lab/stages/encoding.py), unless the
        datamodule reads them already. A T5 encoder under float16 precision is refused."""
        if self.text_encoder is not None and self.text_encoder.config.model_type == "t5" \
                and str(self.trainer.precision).startswith("16"):
            raise ConfigError(f"trainer.precision={self.trainer.precision} runs the T5 text encoder in float16, where "
                              f"its activations overflow: train with precision=bf16 (bf16-mixed) or precision=fp32")
        datamodule = self.trainer.datamodule
        if self._latent_cache_root is None or datamodule is None:
            return
        strategy = self.trainer.strategy
        if datamodule.latent_keys is None:
            encode_latent_cache(self.first_stage, datamodule, self._latent_cache_root, strategy.root_device,
                                ranks_of(strategy))
        if self.image_encoder is not None and datamodule.feature_cache is None:
            encode_feature_cache(self.image_encoder, datamodule, self._latent_cache_root, strategy.root_device,
                                 ranks_of(strategy))
        if self.caches_text and datamodule.text_cache is None:
            encode_text_cache(self.tokenizer, self.text_encoder, datamodule, self._latent_cache_root,
                              strategy.root_device, ranks_of(strategy))
        if datamodule.text_cache is not None:
            self._empty_prompt = text_condition(datamodule.text_cache.shards, "")

    def trained_model(self) -> LatentDiffusionPipeline:
        return self.pipeline()

    def pipeline(self) -> LatentDiffusionPipeline:
        """What sampling and the export use: the first stage, the evaluation denoiser, the latent scale, the
        objective and the classes (:func:`~ldm_lab.diffusion.sampling.assemble`)."""
        return assemble(self.first_stage.vae, self.eval_denoiser, float(self.latent_scale), self.objective,
                        self.class_names, self.tokenizer, self.eval_text_encoder)

    # ----------------------------------------------------------------------------- properties
    @property
    def monitor(self) -> str:
        """The EMA's validation loss of the objective (DDPM: LDM's val/loss_simple_ema)."""
        return f"val/{self.objective.validation_loss}_ema"

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent of the first stage, times the denoiser's side multiple: image sides must divide by it."""
        return self.first_stage.downsample_factor * denoisers.side_multiple(self.denoiser)

    @property
    def trained_network(self) -> nn.Module:
        return self.denoiser

    @property
    def eval_denoiser(self) -> nn.Module:
        """The weights validation's <loss>_ema, image logging, sampling and export use: the EMA when on."""
        return self.ema.module if self.ema is not None else self.denoiser

    @property
    def eval_text_encoder(self) -> nn.Module | None:
        """The text encoder beside :attr:`eval_denoiser`: a trained one's EMA when on."""
        return self.text_ema.module if self.text_ema is not None else self.text_encoder

    def train(self, mode: bool = True) -> LatentDiffusionStage:
        super().train(mode)
        if self.text_encoder is not None and not self.text_encoder_trainable:
            self.text_encoder.eval()  # frozen: never dropout (T5 has some)
        return self

    # ----------------------------------------------------------------------------- optimizers
    def configure_optimizers(self):
        lr = self.lr
        if self.scale_lr:
            batch_size, devices = self.trainer.datamodule.batch_size, self.trainer.world_size
            lr = self.lr * batch_size * self.accumulate_grad_batches * devices
            log.info("learning rate %.3g = %.3g (model.lr) x batch %d x accumulation %d x devices %d", lr, self.lr,
                     batch_size, self.accumulate_grad_batches, devices)
        parameters = list(self.denoiser.parameters())
        if self.text_encoder_trainable:
            parameters += list(self.text_encoder.parameters())
        if self.representation is not None:
            parameters += list(self.representation.parameters())  # REPA's and SRA's head
        optimizer = self.make_optimizer(parameters, lr=lr, **optimizer_options(self.make_optimizer, self.fused_optimizer))
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
    def loss(self, network: nn.Module, latents: torch.Tensor, generator: torch.Generator, training: bool = False,
             inputs: dict | None = None, **condition: torch.Tensor | None) -> torch.Tensor:
        """The objective's loss of ``network`` on ``latents`` given ``condition`` (``class_labels`` or
        ``encoder_hidden_states``, :func:`~ldm_lab.diffusion.pipeline.predict`'s); ``training``: at the objective's
        training timesteps and weighting, else its validation loss. ``inputs`` receives the network's ``noisy``
        latents and ``timesteps``."""
        def predict_noise(noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            if inputs is not None:
                inputs.update(noisy=noisy, timesteps=timesteps)
            return predict(network, noisy, timesteps, **condition)

        return self.objective.loss(predict_noise, latents, generator, training)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        generator = self.step_generator(self.device)
        latents = self.latents(batch, generator)
        condition = self.condition(batch, generator, self.text_encoder)
        if self._router is not None:
            self._router.start(generator)
        inputs = {}
        loss = self.loss(self.denoiser, latents, generator, training=True, inputs=inputs, **condition)
        logs = {self.objective.training_loss: loss.detach()}
        if self.representation is not None:
            extra = self.representation(batch, latents, inputs, self.objective, generator,
                                        lambda noisy, timesteps: predict(self.ema.module, noisy, timesteps, **condition))
            logs[f"loss_{self.representation.name}"] = extra.detach()
            loss = loss + self.representation.weight * extra
        self.backward_and_step([loss], logs)
        if self._router is not None:
            self._router.stop()

    def on_optimizer_step(self) -> None:
        for ema in [self.ema, *self.posthoc_emas]:
            if ema is not None:
                ema.update_parameters(self.denoiser)
        for ema in [self.text_ema, *self.text_posthoc_emas]:
            if ema is not None:
                ema.update_parameters(self.text_encoder)
        if self._snapshots is not None:
            self._snapshots.write(self.step, self.posthoc_averages(), self.max_steps)

    def averaged_networks(self) -> list[nn.Module]:
        return [ema for ema in [self.ema, self.text_ema, *self.posthoc_emas, *self.text_posthoc_emas]
                if ema is not None]

    def posthoc_averages(self) -> dict[str, dict[float, nn.Module]]:
        """The power-function EMAs by network and width: what a post-hoc EMA snapshot holds."""
        averages = {"denoiser": dict(zip(self.sigma_rels, [*self.posthoc_emas, self.ema], strict=True))}
        if self.text_ema is not None:
            averages["text_encoder"] = dict(zip(self.sigma_rels, [*self.text_posthoc_emas, self.text_ema],
                                                strict=True))
        return averages

    def on_train_start(self) -> None:
        """With the post-hoc EMA, its snapshots go to the run folder's ema_snapshots/ (rank 0 writes them)."""
        if self.posthoc_ema:
            self._snapshots = SnapshotWriter(Path(self.trainer.default_root_dir) / FOLDER,
                                             self.posthoc_ema["snapshot_every"],
                                             DTYPES[self.posthoc_ema["snapshot_dtype"]], self.trainer.is_global_zero)
            self._snapshots.start(self.step)

    def on_train_end(self) -> None:
        if self._snapshots is not None:
            self._snapshots.write(self.step, self.posthoc_averages(), self.max_steps, last=True)

    # ----------------------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(3, dtype=torch.float64, device=self.device)

    def _val_generator(self, batch_idx: int, purpose: int) -> torch.Generator:
        """The same randomness for a validation batch at every validation, so losses compare over steps;
        ``purpose`` keeps the posterior sample's noise apart from the diffusion noise."""
        seed = np.random.SeedSequence([self.seed, batch_idx, purpose]).generate_state(1)[0]
        return torch.Generator(self.device).manual_seed(int(seed))

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        latents = self.latents(batch, self._val_generator(batch_idx, 0))
        loss = self.loss(self.denoiser, latents, self._val_generator(batch_idx, 1),
                         **self.condition(batch, None, self.text_encoder))
        loss_ema = self.loss(self.eval_denoiser, latents, self._val_generator(batch_idx, 1),
                             **self.condition(batch, None, self.eval_text_encoder))
        self._val_sums += torch.stack([loss.double(), loss_ema.double(), torch.ones((), device=self.device)]) * len(latents)

    def on_validation_epoch_end(self) -> None:
        loss, loss_ema, count = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum").tolist()
        name = self.objective.validation_loss
        self.log_validation({name: torch.tensor(loss / count), f"{name}_ema": torch.tensor(loss_ema / count)})

    # ----------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["ldm_lab"]["first_stage"] = self.first_stage.describe()  # rebuilds it without its source
        checkpoint["ldm_lab"]["first_stage_source"] = self.first_stage_source  # named when a resume does not match
        if self.text_encoder is not None:  # what rebuilds it without its source (ldm_lab/io/networks.py)
            checkpoint["ldm_lab"]["text_encoder"] = {"class_name": type(self.text_encoder).__name__,
                                                     "config": self.text_encoder.config.to_dict(),
                                                     "tokenizer": tokenizer_files(self.tokenizer)}


def _posthoc_options(posthoc_ema: Mapping | None, ema_decay: float | None) -> dict | None:
    """``model.posthoc_ema`` checked, its widths ascending; None when off (no ``sigma_rels``)."""
    if not posthoc_ema or not posthoc_ema.get("sigma_rels"):
        return None
    options = dict(posthoc_ema)
    widths = sorted(float(s) for s in options["sigma_rels"])
    if len(set(widths)) < 2:
        raise ConfigError(f"model.posthoc_ema.sigma_rels={list(options['sigma_rels'])}: the post-hoc EMA reconstructs "
                          f"other widths from at least two distinct ones, e.g. [0.05,0.10] (EDM2's)")
    if ema_decay:
        raise ConfigError(f"model.posthoc_ema.sigma_rels and model.ema_decay={ema_decay} are both set: the post-hoc "
                          f"EMA replaces the fixed-decay one, add model.ema_decay=null")
    if options["snapshot_dtype"] not in DTYPES:
        raise ConfigError(f"model.posthoc_ema.snapshot_dtype={options['snapshot_dtype']}: one of {', '.join(DTYPES)}")
    if int(options["snapshot_every"]) < 1:
        raise ConfigError(f"model.posthoc_ema.snapshot_every={options['snapshot_every']}: a number of steps, >= 1")
    return {**options, "sigma_rels": widths, "snapshot_every": int(options["snapshot_every"])}


def load_pretrained_denoiser(denoiser: nn.Module, source: str) -> None:
    """Copy into ``denoiser`` the weights of a denoiser source (ldm_lab/io/model_sources.py: a latent diffusion training
    checkpoint, a UNet2DModel, DiTTransformer2DModel or pipeline folder, an original LDM checkpoint); the
    architectures must be the same."""
    pretrained = load_denoiser(source, "model.denoiser_pretrained")
    if type(pretrained) is not type(denoiser):
        raise ConfigError(f"model.denoiser_pretrained={source} holds a {type(pretrained).__name__}, but model.denoiser "
                          f"builds a {type(denoiser).__name__}: choose the model option of that kind")
    keys = denoisers.backbone(denoiser).architecture
    differ = {k: (_plain(pretrained.config[k]), _plain(denoiser.config[k])) for k in keys
              if _plain(pretrained.config[k]) != _plain(denoiser.config[k])}
    if differ:
        raise ConfigError(f"model.denoiser_pretrained={source} is another {type(denoiser).__name__} than "
                          f"model.denoiser: " + "; ".join(f"{k} {a} there, {b} here" for k, (a, b) in differ.items())
                          + ". Set model.denoiser.* to its config")
    denoiser.load_state_dict(pretrained.state_dict())
    log.info("denoiser weights from %s", source)


def _plain(value):
    """A config value comparable across diffusers versions: lists and tuples as lists."""
    return list(value) if isinstance(value, list | tuple) else value
