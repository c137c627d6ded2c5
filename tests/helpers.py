"""Driving a stage through a real Lightning Trainer on hand-made batches."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import lightning as L
import torch

from ldm_lab.stages.autoencoder import AutoencoderStage
from ldm_lab.stages.build import build_stage
from ldm_lab.tasks import model_config
from ldm_lab.tasks.trainer import build_datamodule


def fit(stage: AutoencoderStage, data: list[dict[str, torch.Tensor]] | L.LightningDataModule, callbacks=(),
        ckpt_path=None, root_dir=None, precision: str = "32-true") -> L.Trainer:
    """Train on a datamodule, or on a list of batches (one per micro-batch, repeated each epoch),
    until the stage stops itself after ``max_steps`` generator steps."""
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=-1, logger=False, default_root_dir=root_dir,
                        precision=precision,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=list(callbacks))
    if isinstance(data, L.LightningDataModule):
        trainer.fit(stage, datamodule=data, ckpt_path=ckpt_path)
    else:
        trainer.fit(stage, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None), ckpt_path=ckpt_path)
    return trainer


def random_batches(n: int, batch_size: int = 2, size: int = 32, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"pixel_values": torch.rand(batch_size, 3, size, size, generator=g) * 2 - 1} for _ in range(n)]


class RecordSeenImages(L.Callback):
    """Appends the dataset index of every training image to ``<dirpath>/seen_rank<rank>.txt``."""

    def __init__(self, dirpath: str):
        self.dirpath = dirpath

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        shape = tuple(batch["latents" if "latents" in batch else "pixel_values"].shape[2:])
        with open(f"{self.dirpath}/seen_rank{trainer.global_rank}.txt", "a") as handle:
            handle.write("".join(f"{int(i)} {shape}\n" for i in batch["index"]))


class CountGradientSyncs(L.Callback):
    """Counts the backward passes in which DDP all-reduced gradients (its comm hook sees the last bucket once
    per synchronised backward) and writes them, with a checksum of the final weights, to
    ``<dirpath>/syncs_rank<rank>.json``."""

    def __init__(self, dirpath: str):
        self.dirpath, self.syncs = dirpath, 0

    def on_train_start(self, trainer, pl_module):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counting_hook(process_group, bucket):
            self.syncs += bucket.is_last()
            return allreduce_hook(process_group, bucket)

        trainer.strategy.model.register_comm_hook(None, counting_hook)

    def on_train_end(self, trainer, pl_module):
        checksum = sum(float(p.double().sum()) for p in pl_module.parameters())
        record = {"syncs": self.syncs, "steps": pl_module.step, "skipped": pl_module.nonfinite_skipped,
                  "checksum": checksum}
        Path(f"{self.dirpath}/syncs_rank{trainer.global_rank}.json").write_text(json.dumps(record))


class PoisonBatch(L.Callback):
    """Puts a NaN into micro-batch ``batch_idx`` (counted from 0) on rank ``rank``."""

    def __init__(self, batch_idx: int, rank: int):
        self.batch_idx, self.rank = batch_idx, rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.batch_idx and trainer.global_rank == self.rank:
            batch["pixel_values"][0, 0, 0, 0] = float("nan")


class StopAt(L.Callback):
    """Kills the run after ``step`` optimizer steps, leaving a checkpoint behind; ``stop=False``: saves the
    checkpoint and trains on (a run killed later, past its last checkpoint)."""

    def __init__(self, step: int, path, stop: bool = True):
        self.at, self.path, self.stop = step, path, stop

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.step == self.at and not self.path.exists():
            trainer.save_checkpoint(self.path)
            trainer.should_stop = self.stop


def fit_latent_stage(model_cfg, batches: list[dict], root_dir, callbacks=(), ckpt_path=None):
    """A latent diffusion stage of ``model_cfg`` built from seed 0, its latent scale 1, fitted on ``batches`` of
    cached latents until ``model.max_steps``."""
    from ldm_lab.stages.build import build_stage

    L.seed_everything(0, verbose=False)
    stage = build_stage(model_cfg, None)
    stage.latent_scale.fill_(1.0)
    fit(stage, batches, callbacks, ckpt_path, root_dir=root_dir)
    return stage


class SignalAt(L.Callback):
    """Sends ``signum`` when micro-batch ``micro_step`` + 1 starts: to this process, or with ``group`` to its
    whole process group, as Ctrl-C in a terminal does (DataLoader workers get it too)."""

    def __init__(self, micro_step: int, signum: int = signal.SIGTERM, group: bool = False):
        self.micro_step, self.signum, self.group, self.sent = micro_step, int(signum), group, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.micro_step == self.micro_step and not self.sent:
            self.sent = True
            if self.group:
                os.killpg(os.getpgid(0), self.signum)
            else:
                os.kill(os.getpid(), self.signum)


def save_tiny_first_stage(kind: str, path, seed: int = 0):
    """A randomly initialised f4 first stage (``kind`` kl: 4 channels, vq: 3 channels and 64 codes) saved
    as a diffusers folder: enough for the LDM machinery, which never trains it."""
    from diffusers import AutoencoderKL, VQModel

    torch.manual_seed(seed)
    common = dict(block_out_channels=(16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3,
                  up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, norm_num_groups=8)
    vae = (AutoencoderKL(latent_channels=4, **common) if kind == "kl"
           else VQModel(latent_channels=3, vq_embed_dim=3, num_vq_embeddings=64, **common))
    vae.save_pretrained(path)
    return path


def save_tiny_text_encoder(kind: str, path, captions: list[str], seed: int = 0):
    """A randomly initialised text encoder and a tokenizer learned from ``captions``, saved as a pretrained folder
    (model and tokenizer files together) that ``model/text_encoder=clip_l`` or ``t5_base`` loads from
    ``pretrained_model_name_or_path``: ``kind`` clip (CLIP's BPE, 16 tokens) or t5 (a Unigram tokenizer ending each
    text with ``</s>``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel, T5TokenizerFast

    from ldm_lab.nn.text_encoders import save_tokenizer, train_tokenizer

    torch.manual_seed(seed)
    if kind == "clip":
        tokenizer = train_tokenizer(captions, vocab_size=300, max_length=16)
        model = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=64, max_position_embeddings=16,
                                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                             pad_token_id=tokenizer.pad_token_id))
    else:
        backend = Tokenizer(models.Unigram())
        backend.pre_tokenizer, backend.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
        backend.train_from_iterator(captions, trainers.UnigramTrainer(
            vocab_size=100, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"))
        backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
        tokenizer = T5TokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                    extra_ids=0, model_max_length=24)
        model = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=16, d_ff=64, num_layers=1,
                                        num_heads=2, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    model.save_pretrained(path)
    save_tokenizer(tokenizer, path)
    return path


def save_tiny_dinov2(path, seed: int = 0, registers: int = 0):
    """A randomly initialised DINOv2 (32 wide, 2 layers, 4-px patches; with ``registers``, the register variant)
    saved as a pretrained folder, as ``model.representation.encoder`` loads one."""
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(seed)
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, patch_size=4, image_size=32)
    model = (Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **common)) if registers
             else Dinov2Model(Dinov2Config(**common)))
    model.save_pretrained(path)
    return path


def text_stage(cfg, tmp_path):
    """The stage a text config builds, its tokenizer (a scratch encoder's) learned into ``tmp_path / "tokenizer"``."""
    return build_stage(model_config.with_data(cfg.model, build_datamodule(cfg), tmp_path / "tokenizer"), cfg.disc)


def save_tiny_clip(path, captions: list[str], seed: int = 0):
    """A randomly initialised CLIPModel (32 px images) and its CLIPProcessor saved as a pretrained folder, as
    ``evaluate.clip_model`` loads one."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from ldm_lab.nn.text_encoders import train_tokenizer

    torch.manual_seed(seed)
    tokenizer = train_tokenizer(captions, vocab_size=300, max_length=16)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=64)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path
