"""Checkpoints of the original code as diffusers models: LDM's and taming's autoencoders (vq-f4, kl-f8,
Stable Diffusion's VAE), LDM's unconditional UNet (openaimodel.UNetModel, the celebahq-ldm-vq-4 one),
and whole LDM checkpoints (first stage + UNet + schedule) as an ``LDMPipeline``.

The architecture is read from the tensors' shapes; what shapes cannot tell (channels per attention
head, the latent side the pipeline samples) comes from the original YAML config when given, otherwise
LDM-VQ-4's values. The autoencoders' encoder and decoder are mapped by diffusers' own single-file
converter; the UNet mapping is written here (diffusers ships none for the unconditional UNet in its
package) and checked against the original code's outputs (tests/fixtures/make_parity_fixtures.py).
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import types
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, LDMPipeline, UNet2DModel, VQModel
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from omegaconf import OmegaConf

from ldm_lab.core.atomic import publish_folder, side_folder

log = logging.getLogger(__name__)

KINDS = ("vq", "kl", "unet", "ldm")
UNET_PREFIX, FIRST_STAGE_PREFIX, EMA_PREFIX = "model.diffusion_model.", "first_stage_model.", "model_ema."
LDM_VQ4 = {"attention_head_dim": 32, "sample_size": 64}  # celebahq-ldm-vq-4.yaml: num_head_channels, image_size


class _Stub:
    """Stands for a class of a package that is not installed (pytorch_lightning callbacks, ...)."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


class _LenientUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return _Stub


_lenient_pickle = types.SimpleNamespace(Unpickler=_LenientUnpickler, load=pickle.load, __name__="lenient_pickle")


def load_original(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of an original checkpoint: a ``.ckpt`` (its ``state_dict``; objects of packages that
    are not installed, such as pytorch_lightning's, are skipped) or a ``.safetensors`` file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_lenient_pickle, mmap=True)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds no state dict of tensors: not a checkpoint of the original code")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def detect_kind(state: dict[str, torch.Tensor]) -> str:
    """vq | kl | unet | ldm, from the keys."""
    if any(k.startswith(UNET_PREFIX) for k in state) and any(k.startswith(FIRST_STAGE_PREFIX) for k in state):
        return "ldm"
    if "input_blocks.0.0.weight" in state or f"{UNET_PREFIX}input_blocks.0.0.weight" in state:
        return "unet"
    vae = _strip(state, FIRST_STAGE_PREFIX) if any(k.startswith(FIRST_STAGE_PREFIX) for k in state) else state
    if "quantize.embedding.weight" in vae:
        return "vq"
    if "encoder.conv_in.weight" in vae and "quant_conv.weight" in vae:
        return "kl"
    raise ValueError("the checkpoint holds none of: an LDM/taming VQ or KL autoencoder (encoder.*, quant_conv), "
                     "an LDM UNet (input_blocks.*), a whole LDM (model.diffusion_model.* and first_stage_model.*)")


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# ----------------------------------------------------------------------------------------- autoencoders
def _count(state: dict, pattern: str) -> int:
    """How many indices ``i`` have a key starting with ``pattern.format(i)``."""
    count = 0
    while any(k.startswith(pattern.format(count)) for k in state):
        count += 1
    return count


def vae_config(state: dict[str, torch.Tensor], kind: str) -> dict:
    """diffusers ``VQModel`` / ``AutoencoderKL`` arguments for an LDM/taming Encoder-Decoder state dict."""
    levels = _count(state, "encoder.down.{}.")
    if any(".attn." in k for k in state if k.startswith(("encoder.down.", "decoder.up."))):
        raise NotImplementedError("attention inside the encoder/decoder levels (attn_resolutions non-empty, e.g. "
                                  "vq-f8, kl-f16) has no diffusers VQModel/AutoencoderKL counterpart here")
    config = dict(
        in_channels=state["encoder.conv_in.weight"].shape[1],
        out_channels=state["decoder.conv_out.weight"].shape[0],
        block_out_channels=[state[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in range(levels)],
        layers_per_block=_count(state, "encoder.down.0.block.{}."),
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        norm_num_groups=32,
        mid_block_add_attention="encoder.mid.attn_1.q.weight" in state,
        latent_channels=state["post_quant_conv.weight"].shape[0],
    )
    if kind == "vq":
        num_codes, dim = state["quantize.embedding.weight"].shape
        config.update(num_vq_embeddings=num_codes, vq_embed_dim=dim, scaling_factor=1.0)
    elif state["quant_conv.weight"].shape[0] != 2 * config["latent_channels"]:
        raise NotImplementedError("a KL autoencoder whose embed_dim differs from z_channels has no diffusers "
                                  "AutoencoderKL counterpart")
    return config


def convert_vae(state: dict[str, torch.Tensor], kind: str) -> VQModel | AutoencoderKL:
    """An LDM/taming VQ (``vq``) or KL (``kl``) autoencoder state dict (bare, or under first_stage_model.)
    as a diffusers model; the training loss' weights (``loss.*``: discriminator, LPIPS) are left out."""
    if any(k.startswith(FIRST_STAGE_PREFIX) for k in state):
        state = _strip(state, FIRST_STAGE_PREFIX)
    config = vae_config(state, kind)
    converted = convert_ldm_vae_checkpoint(state, config)
    model = VQModel(**config) if kind == "vq" else AutoencoderKL(**config)
    if kind == "vq":
        converted["quantize.embedding.weight"] = state["quantize.embedding.weight"]
    model.load_state_dict(converted, strict=True)
    return model.eval()


# ----------------------------------------------------------------------------------------- the UNet
RESNET = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
          ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut"))


def unet_config(state: dict[str, torch.Tensor], attention_head_dim: int, sample_size: int) -> dict:
    """diffusers ``UNet2DModel`` arguments for an LDM ``openaimodel.UNetModel`` state dict (unconditional,
    AttentionBlock attention, conv resampling)."""
    downsamplers = sorted(int(k.split(".")[1]) for k in state if k.startswith("input_blocks.") and k.endswith(".op.weight"))
    layers = downsamplers[0] - 1 if downsamplers else _count(state, "input_blocks.{}.") - 1
    levels = len(downsamplers) + 1
    first = [1 + level * (layers + 1) for level in range(levels)]  # each level's first input block
    attention = [f"input_blocks.{i}.1.qkv.weight" in state for i in first]
    out_channels = state["out.2.weight"].shape[0]
    emb = state["input_blocks.1.0.emb_layers.1.weight"].shape[0]
    return dict(
        sample_size=sample_size,
        in_channels=state["input_blocks.0.0.weight"].shape[1],
        out_channels=out_channels,
        block_out_channels=[state[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0] for i in first],
        layers_per_block=layers,
        down_block_types=["AttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        up_block_types=["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        attention_head_dim=attention_head_dim,
        norm_num_groups=32,
        resnet_time_scale_shift="scale_shift" if emb == 2 * state["input_blocks.1.0.out_layers.3.weight"].shape[0]
        else "default",
    )


def convert_unet_state_dict(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """LDM UNetModel keys -> diffusers UNet2DModel keys. LDM's AttentionBlock keeps q, k and v in one
    1x1 conv laid out (heads, 3, head_dim) (QKVAttentionLegacy); diffusers has three linear maps."""
    new: dict[str, torch.Tensor] = {}

    def copy(src: str, dst: str) -> None:
        for parameter in ("weight", "bias"):
            new[f"{dst}.{parameter}"] = state[f"{src}.{parameter}"]

    def resnet(src: str, dst: str) -> None:
        for old, renamed in RESNET:
            if f"{src}.{old}.weight" in state:
                copy(f"{src}.{old}", f"{dst}.{renamed}")

    def attention(src: str, dst: str) -> None:
        copy(f"{src}.norm", f"{dst}.group_norm")
        weight, bias = state[f"{src}.qkv.weight"][:, :, 0], state[f"{src}.qkv.bias"]
        channels = weight.shape[1]
        heads = channels // config["attention_head_dim"]
        weight = weight.reshape(heads, 3, channels // heads, channels)
        bias = bias.reshape(heads, 3, channels // heads)
        for i, name in enumerate("qkv"):
            new[f"{dst}.to_{name}.weight"] = weight[:, i].reshape(channels, channels)
            new[f"{dst}.to_{name}.bias"] = bias[:, i].reshape(channels)
        new[f"{dst}.to_out.0.weight"] = state[f"{src}.proj_out.weight"][:, :, 0]
        new[f"{dst}.to_out.0.bias"] = state[f"{src}.proj_out.bias"]

    layers, levels = config["layers_per_block"], len(config["block_out_channels"])
    copy("input_blocks.0.0", "conv_in")
    copy("time_embed.0", "time_embedding.linear_1")
    copy("time_embed.2", "time_embedding.linear_2")
    for level in range(levels):
        for j in range(layers):
            block = 1 + level * (layers + 1) + j
            resnet(f"input_blocks.{block}.0", f"down_blocks.{level}.resnets.{j}")
            if f"input_blocks.{block}.1.qkv.weight" in state:
                attention(f"input_blocks.{block}.1", f"down_blocks.{level}.attentions.{j}")
        if level < levels - 1:
            copy(f"input_blocks.{1 + level * (layers + 1) + layers}.0.op", f"down_blocks.{level}.downsamplers.0.conv")
    resnet("middle_block.0", "mid_block.resnets.0")
    attention("middle_block.1", "mid_block.attentions.0")
    resnet("middle_block.2", "mid_block.resnets.1")
    for level in range(levels):
        for j in range(layers + 1):
            block = level * (layers + 1) + j
            resnet(f"output_blocks.{block}.0", f"up_blocks.{level}.resnets.{j}")
            if f"output_blocks.{block}.1.qkv.weight" in state:
                attention(f"output_blocks.{block}.1", f"up_blocks.{level}.attentions.{j}")
        if level < levels - 1:
            last = level * (layers + 1) + layers
            index = 2 if f"output_blocks.{last}.1.qkv.weight" in state else 1
            copy(f"output_blocks.{last}.{index}.conv", f"up_blocks.{level}.upsamplers.0.conv")
    copy("out.0", "conv_norm_out")
    copy("out.2", "conv_out")
    return new


def convert_unet(state: dict[str, torch.Tensor], attention_head_dim: int = LDM_VQ4["attention_head_dim"],
                 sample_size: int = LDM_VQ4["sample_size"], ema: bool = True) -> UNet2DModel:
    """An LDM UNet state dict (bare, or under model.diffusion_model. with, when ``ema``, LDM's EMA copy
    under model_ema. used instead: what LDM samples with) as a diffusers UNet2DModel."""
    if any(k.startswith(UNET_PREFIX) for k in state):
        unet_state = _strip(state, UNET_PREFIX)
        ema_names = {k: EMA_PREFIX + f"diffusion_model.{k}".replace(".", "") for k in unet_state}  # LitEma's names
        averaged = {k: state[name] for k, name in ema_names.items() if name in state}
        state = unet_state
        if ema and averaged:
            if averaged.keys() != {k for k, v in state.items() if v.is_floating_point()}:
                raise ValueError("the checkpoint's EMA (model_ema.*) covers only part of the UNet: convert.ema=false")
            state = {**state, **averaged}
            log.info("UNet: the checkpoint's EMA weights (model_ema.*)")
    config = unet_config(state, attention_head_dim, sample_size)
    model = UNet2DModel(**config)
    model.load_state_dict(convert_unet_state_dict(state, config), strict=True)
    return model.eval()


# ----------------------------------------------------------------------------------------- whole LDMs
def ldm_scheduler(state: dict[str, torch.Tensor]) -> DDIMScheduler:
    """The checkpoint's own betas (LDM stores them) with LDM's DDIM spacing (tests/fixtures: ldm_ddim_reference)."""
    betas = state["betas"].double().tolist()
    return DDIMScheduler(num_train_timesteps=len(betas), trained_betas=betas, clip_sample=False,
                         prediction_type="epsilon", steps_offset=1, set_alpha_to_one=False)


def convert_ldm(state: dict[str, torch.Tensor], attention_head_dim: int = LDM_VQ4["attention_head_dim"],
                sample_size: int = LDM_VQ4["sample_size"], ema: bool = True) -> LDMPipeline:
    """A whole unconditional LDM checkpoint as an LDMPipeline: the first stage with LDM's scale_factor
    as scaling_factor (1.0 when the checkpoint stores none: scale_by_std false), the UNet, the schedule."""
    vae_state = _strip(state, FIRST_STAGE_PREFIX)
    vae = convert_vae(vae_state, "vq" if "quantize.embedding.weight" in vae_state else "kl")
    scale = float(state["scale_factor"]) if "scale_factor" in state else 1.0
    vae.register_to_config(scaling_factor=scale)
    unet = convert_unet(state, attention_head_dim, sample_size, ema)
    return LDMPipeline(vqvae=vae, unet=unet, scheduler=ldm_scheduler(state))


def original_options(config_path: str | os.PathLike | None) -> dict:
    """attention_head_dim and sample_size from an original YAML config (LDM's unet_config.params), else LDM-VQ-4's."""
    if config_path is None:
        return dict(LDM_VQ4)
    config = OmegaConf.load(config_path)
    params = OmegaConf.select(config, "model.params.unet_config.params") or OmegaConf.select(config, "model.params")
    head_dim = params.get("num_head_channels", -1)
    if head_dim == -1 and params.get("num_heads", -1) != -1:
        raise NotImplementedError("a UNet with num_heads (a fixed head count per level) has no single "
                                  "diffusers attention_head_dim; num_head_channels configs convert")
    return {"attention_head_dim": head_dim if head_dim != -1 else LDM_VQ4["attention_head_dim"],
            "sample_size": params.get("image_size", LDM_VQ4["sample_size"])}


def convert(source: str | os.PathLike, out_dir: str | os.PathLike, kind: str | None = None,
            config: str | os.PathLike | None = None, ema: bool = True) -> Path:
    """Convert an original checkpoint and ``save_pretrained`` it to ``out_dir``; returns ``out_dir``. Without
    ``config``, a config.yaml beside the checkpoint (as LDM's model-zoo downloads hold it) is read."""
    beside = Path(source).with_name("config.yaml")
    config = config if config is not None or not beside.is_file() else beside
    state = load_original(source)
    kind = kind or detect_kind(state)
    if kind not in KINDS:
        raise ValueError(f"convert.kind={kind}: one of {', '.join(KINDS)}")
    options = original_options(config) if kind in ("unet", "ldm") else {}
    if config is None and kind in ("unet", "ldm"):
        log.info("no convert.config: %d channels per attention head and %d-latent samples (LDM-VQ-4's)",
                 options["attention_head_dim"], options["sample_size"])
    if kind in ("vq", "kl"):
        model = convert_vae(state, kind)
    elif kind == "unet":
        model = convert_unet(state, ema=ema, **options)
    else:
        model = convert_ldm(state, ema=ema, **options)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    log.info("converted %s (%s) -> %s", source, kind, out_dir)
    return out_dir


def cache_root() -> Path:
    return Path(os.environ.get("LDM_LAB_CACHE", Path.home() / ".cache" / "ldm_lab")) / "converted"


def converted(source: str | os.PathLike) -> Path:
    """The diffusers folder of an original checkpoint: the file is converted once and cached (by its and its
    config.yaml's path, size and modification time) under $LDM_LAB_CACHE/converted (default
    ~/.cache/ldm_lab/converted). What it holds is read by ldm_lab/io/model_sources.py."""
    source = Path(source).resolve()
    stamps = [f"{p}|{p.stat().st_size}|{p.stat().st_mtime_ns}" for p in (source, source.with_name("config.yaml"))
              if p.is_file()]
    key = hashlib.sha1("\n".join(stamps).encode()).hexdigest()[:16]
    folder = cache_root() / f"{source.stem}-{key}"
    if not folder.is_dir():  # converted into this process's side folder, published whole (jobs may race)
        folder.parent.mkdir(parents=True, exist_ok=True)
        built = side_folder(folder)
        convert(source, built)
        publish_folder(built, folder, lambda found: found.is_dir())
    return folder


def is_original(path: str | os.PathLike) -> bool:
    """Whether a checkpoint file is the original code's, not a lab training checkpoint."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return True
    checkpoint = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_lenient_pickle, mmap=True)
    return not (isinstance(checkpoint, dict) and "ldm_lab" in checkpoint)
