"""Text encoders a text-conditional model reads prompts with (``model/text_encoder``): transformers' tokenizers and
text models, encoded as the exported pipeline encodes them (ldm_lab/diffusion/pipeline.py ``encode_prompt``).

- :func:`pretrained`: a frozen encoder from a hub id or a local folder (CLIP ViT-L/14's text tower, Stable
  Diffusion 1.x's; a T5 encoder, as PixArt and Imagen use).
- :func:`scratch`: a small CLIP-architecture text transformer (``CLIPTextModel``), trained with the denoiser as
  GLIDE (Nichol et al. 2022) trained its text transformer, with a byte-level BPE tokenizer trained once on the data's
  own captions (:func:`train_tokenizer`): what works offline.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from tokenizers import pre_tokenizers
from torch import nn
from transformers import (
    AutoConfig,
    AutoTokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
)

from ldm_lab.core.errors import ConfigError
from ldm_lab.core.weights import MissingWeightsError, offline_config

MODEL_CLASSES = {"clip": CLIPTextModel, "clip_text_model": CLIPTextModel, "t5": T5EncoderModel}  # by model_type


@dataclass
class TextEncoder:
    """A tokenizer and its text model; ``trainable``: trained with the denoiser (else frozen)."""

    tokenizer: object
    model: nn.Module
    trainable: bool

    @property
    def width(self) -> int:
        return embedding_width(self.model)


def embedding_width(text_model: nn.Module) -> int:
    """The width of a text model's embeddings: what the denoiser's cross-attention reads."""
    config = text_model.config
    return getattr(config, "hidden_size", None) or config.d_model


def train_tokenizer(captions: Iterable[str], vocab_size: int, max_length: int) -> CLIPTokenizer:
    """CLIP's byte-level BPE (lower-cased, ``<|startoftext|>`` / ``<|endoftext|>``), its merges learned from
    ``captions``; ``model_max_length`` = ``max_length``, the text model's positions. As CLIP's, the vocabulary holds
    every byte, alone and ending a word, so no text is unknown. The same captions give the same ids: the trainer
    numbers its alphabet in hash order, so the ids are renumbered (special tokens, the alphabet sorted, then each
    merge's token in merge order)."""
    trained = json.loads(CLIPTokenizer().train_new_from_iterator(captions, vocab_size=vocab_size)
                         .backend_tokenizer.to_str())["model"]
    merges = [tuple(pair) for pair in trained["merges"]]
    merged = {a + b: i for i, (a, b) in enumerate(merges)}
    special = ("<|startoftext|>", "<|endoftext|>")
    byte_tokens = pre_tokenizers.ByteLevel.alphabet()
    tokens = (set(trained["vocab"]) | set(byte_tokens) | {b + "</w>" for b in byte_tokens}) - set(special)
    order = sorted(tokens, key=lambda t: (merged.get(t, -1), t))
    vocab = {token: i for i, token in enumerate([*special, *order])}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def save_tokenizer(tokenizer, folder: str | Path) -> Path:
    """``save_pretrained`` (tokenizer.json, tokenizer_config.json) and, for a BPE tokenizer, its vocab.json and
    merges.txt, which tools that predate tokenizer.json read."""
    folder = Path(folder)
    tokenizer.save_pretrained(folder)
    model = tokenizer.backend_tokenizer.model
    if type(model).__name__ == "BPE":
        model.save(str(folder))
    return folder


def tokenizer_files(tokenizer) -> dict[str, str]:
    """A tokenizer as its files' texts (what a checkpoint stores)."""
    with tempfile.TemporaryDirectory() as folder:
        save_tokenizer(tokenizer, folder)
        return {path.name: path.read_text(encoding="utf-8") for path in sorted(Path(folder).iterdir())}


def count_truncated(tokenizer, texts: list[str], batch_size: int = 4096) -> int:
    """How many of ``texts`` have more tokens (with the start and end tokens) than ``model_max_length``."""
    longer = 0
    for start in range(0, len(texts), batch_size):
        ids = tokenizer(texts[start : start + batch_size], truncation=False)["input_ids"]
        longer += sum(len(tokens) > tokenizer.model_max_length for tokens in ids)
    return longer


def same_tokenizer(a, b) -> bool:
    """Whether two tokenizers cut text alike: the same model (vocabulary, merges or pieces) and context length,
    whatever their saved call settings."""
    def model(tokenizer) -> dict:
        return json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    return model(a) == model(b) and a.model_max_length == b.model_max_length


def tokenizer_of_files(files: dict[str, str]):
    """The tokenizer :func:`tokenizer_files` stored."""
    with tempfile.TemporaryDirectory() as folder:
        for name, text in files.items():
            (Path(folder) / name).write_text(text, encoding="utf-8")
        return AutoTokenizer.from_pretrained(folder)


def load_text_model(folder: str | Path) -> nn.Module:
    """A saved text model by the class its config.json names (``architectures``: AutoModel would make a T5 encoder
    a whole encoder-decoder)."""
    config = AutoConfig.from_pretrained(folder)
    name = (config.architectures or [MODEL_CLASSES[config.model_type].__name__])[0]
    return getattr(transformers, name).from_pretrained(folder)


def scratch(tokenizer: str | None, hidden_size: int = 256, num_hidden_layers: int = 4, num_attention_heads: int = 4,
            intermediate_size: int = 1024, vocab_size: int = 8192, max_length: int = 77) -> TextEncoder:
    """A randomly initialised ``CLIPTextModel`` for the tokenizer saved in folder ``tokenizer`` (task=train trains
    it on the captions, ``vocab_size`` tokens, ``max_length`` positions), trained with the denoiser."""
    if tokenizer is None:
        raise ConfigError("model.text_encoder=scratch reads prompts with a tokenizer trained on the data's captions, "
                          "which task=train makes before the model is built (model.text_encoder.tokenizer=<its "
                          "folder> to give one)")
    loaded = AutoTokenizer.from_pretrained(tokenizer)
    config = CLIPTextConfig(vocab_size=len(loaded), hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                            num_attention_heads=num_attention_heads, intermediate_size=intermediate_size,
                            max_position_embeddings=loaded.model_max_length, bos_token_id=loaded.bos_token_id,
                            eos_token_id=loaded.eos_token_id, pad_token_id=loaded.pad_token_id)
    return TextEncoder(loaded, CLIPTextModel(config), trainable=True)


def pretrained(pretrained_model_name_or_path: str, tokenizer: str | None = None, revision: str | None = None,
               subfolder: str | None = None, tokenizer_subfolder: str | None = None, max_length: int | None = None,
               dtype: str | None = None, trainable: bool = False) -> TextEncoder:
    """A pretrained text model (CLIP's text tower or a T5 encoder) and its tokenizer, from a hub id or a local
    folder (``subfolder``: a pipeline folder's ``text_encoder``; ``tokenizer``: another tokenizer folder), frozen
    unless ``trainable``; ``max_length``: tokens per prompt (default: the tokenizer's ``model_max_length``;
    PixArt-alpha reads 120 T5 tokens); ``dtype``: its weights' (float32, bfloat16; T5 overflows in float16)."""
    name = pretrained_model_name_or_path
    try:
        config = AutoConfig.from_pretrained(name, revision=revision, subfolder=subfolder or "")
        model_class = MODEL_CLASSES.get(config.model_type)
        if model_class is None:
            raise ConfigError(f"model.text_encoder.pretrained_model_name_or_path={name} is a {config.model_type} "
                              f"model; the lab reads prompts with {', '.join(sorted(set(MODEL_CLASSES)))} encoders")
        if dtype == "float16" and config.model_type == "t5":
            raise ConfigError("model.text_encoder.dtype=float16: T5's activations overflow in float16 (its "
                              "feed-forward outputs exceed 65504); use bfloat16 or float32")
        model = model_class.from_pretrained(name, revision=revision, subfolder=subfolder or "",
                                            dtype=getattr(torch, dtype or "float32"))
        loaded = AutoTokenizer.from_pretrained(tokenizer or name, revision=None if tokenizer else revision,
                                               subfolder="" if tokenizer else tokenizer_subfolder or "")
    except OSError as error:
        raise MissingWeightsError(
            f"could not load the text encoder {name!r} ({type(error).__name__}: {str(error).splitlines()[0]}). "
            f"Without network access, download it where you have one (huggingface-cli download {name} "
            f"--local-dir /path/to/copy), bring it here and set "
            f"model.text_encoder.pretrained_model_name_or_path=/path/to/copy") from error
    if max_length is not None:
        loaded.model_max_length = max_length
    return TextEncoder(loaded, model, trainable)


# The architectures of the pretrained encoders the lab's configs name, for task=plan offline (their config.json)
ARCHITECTURES = {
    "openai/clip-vit-large-patch14": lambda: CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768),
    "google/t5-v1_1-base": lambda: T5Config(
        vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}


def stand_in(pretrained_model_name_or_path: str, max_length: int | None = None, dtype: str | None = None,
             trainable: bool = False) -> TextEncoder:
    """A randomly initialised encoder of a pretrained one's architecture (its config where a local copy or the hub
    cache has it, else the lab's copy for the encoders its configs name) with a stand-in tokenizer of its context
    length: what task=plan builds offline, with the same memory."""
    config = offline_config(pretrained_model_name_or_path, ARCHITECTURES,
                            "model.text_encoder.pretrained_model_name_or_path")
    model = MODEL_CLASSES[config.model_type](config).to(getattr(torch, dtype or "float32"))
    context = max_length or getattr(config, "max_position_embeddings", None) or 512
    return TextEncoder(train_tokenizer(["a stand-in caption"], vocab_size=300, max_length=context), model, trainable)
