"""Encoding a data set into the caches of frozen networks (ldm_lab/data/latent_cache.py stores them): the latent cache,
with the frozen first stage (LDM, Rombach et al. 2022, sec. 3), the text cache, each caption's embedding with a
frozen text encoder, and the feature cache, each image's patch features with REPA's image encoder; what
task=cache_latents, and task=train with ``model.latent_cache=true`` before training, run. Under DDP every process
encodes its share, as kohya's and MosaicML's precompute scripts do, and the shares are gathered into one manifest
and one latent scale, so N devices encode about N times faster. The datamodule then only reads the caches."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ldm_lab.core.atomic import folder_lock
from ldm_lab.core.errors import ConfigError
from ldm_lab.core.fingerprint import fingerprint, text_key
from ldm_lab.data.datamodule import ImageDataModule
from ldm_lab.data.latent_cache import KeyedImages, LatentCache
from ldm_lab.diffusion.pipeline import encode_prompt, masks_padding
from ldm_lab.nn.frozen_autoencoder import FrozenAutoencoder, LatentScale
from ldm_lab.nn.image_encoders import ImageEncoder
from ldm_lab.nn.text_encoders import embedding_width

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ranks:
    """The processes that encode together, and how they meet: this one's ``rank`` of ``world_size``,
    ``all_gather`` (an object from each, in rank order) and ``barrier``. One process by default."""

    rank: int = 0
    world_size: int = 1
    all_gather: Callable[[object], list] = lambda part: [part]
    barrier: Callable[[], None] = lambda: None


def ranks_of(strategy) -> Ranks:
    """The ranks of a Lightning strategy whose processes have started (its ``setup`` hooks and later)."""
    if strategy.world_size == 1:
        return Ranks()

    def all_gather(part: object) -> list:
        parts = [None] * strategy.world_size
        torch.distributed.all_gather_object(parts, part)
        return parts

    return Ranks(strategy.global_rank, strategy.world_size, all_gather, strategy.barrier)


@torch.no_grad()
def encode_latent_cache(first_stage: FrozenAutoencoder, datamodule: ImageDataModule, root: str | os.PathLike,
                        device: torch.device | None = None, ranks: Ranks = Ranks()) -> dict:
    """Encode every image of ``datamodule`` the cache under ``root`` lacks, at its bucket resolution (center
    crop, no flip) and, with buckets, at the leftover resolution too, on ``device`` (default: the GPU when there
    is one); every rank takes every ``world_size``-th batch. Write the manifest (per image, its key at each
    resolution and, for labelled data, the class of the image encoded, which for an image that cannot be decoded
    is its replacement's; the latent scale over the training images at their bucket resolution), point the
    datamodule at the cache and return the manifest. Jobs that share the cache take turns (its folder lock,
    held by rank 0 for all ranks of a job), and a later one finds the latents written."""
    cache = LatentCache(root, first_stage.fingerprint())
    if ranks.world_size == 1:
        datamodule.prepare_data()  # the sources write or download their images once (under DDP, Lightning did)
    datamodule.setup_index()
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with folder_lock(cache.dir) if ranks.rank == 0 else nullcontext():
        ranks.barrier()  # the other ranks wait while rank 0 waits for the lock
        cache.refresh()  # what another job wrote while this one waited
        share = _encode_share(first_stage, datamodule, cache, device, ranks)
        cache.flush()
        keys, labels, scale, encoded, seen = _merge(ranks.all_gather(share), len(datamodule.is_val), first_stage.kind)
        manifest = {"kind": first_stage.kind, "scaling_factor": scale.scaling_factor, "keys": keys}
        if datamodule.class_names is not None:
            manifest["labels"] = labels
        if ranks.rank == 0:
            cache.write_manifest(datamodule.data_key(), manifest)
        ranks.barrier()  # every share is written before the lock is released
    cache.refresh()  # the shards the other ranks wrote
    log.info("latent cache %s: %d latents encoded, %d already there (%d by this process of %d); latent scale "
             "1/std = %.5f", cache.dir, encoded, seen - encoded, share["encoded"], ranks.world_size,
             manifest["scaling_factor"])
    datamodule.use_latent_cache(cache, manifest)
    return manifest


def _encode_share(first_stage: FrozenAutoencoder, datamodule: ImageDataModule, cache: LatentCache,
                  device: torch.device, ranks: Ranks) -> dict:
    """This rank's batches encoded into ``cache``: per image its keys by resolution and the class it was encoded
    from, the latent scale's sums over the training images at their bucket resolution, and the counts."""
    keys: dict[int, dict[str, str]] = {}
    labels: dict[int, int] = {}
    scale = LatentScale(first_stage.kind)
    encoded = seen = 0
    with _on(first_stage, device):
        for batch in _image_batches(datamodule, ranks, "latent cache"):
            missing = [i for i, key in enumerate(batch["key"]) if key not in cache]
            if missing:
                moments = first_stage.moments(batch["pixel_values"][missing].to(device)).float().cpu()
                for row, i in enumerate(missing):
                    cache.add(batch["key"][i], moments[row])
                encoded += len(missing)
            height, width = batch["pixel_values"].shape[2:]
            served = batch["class_labels"].tolist() if "class_labels" in batch else [-1] * len(batch["key"])
            for key, index, label in zip(batch["key"], batch["index"].tolist(), served, strict=True):
                own = datamodule.resolutions[datamodule.image_buckets[index]] == (height, width)
                if own and not datamodule.is_val[index]:
                    scale.update(cache.get(key))
                keys.setdefault(index, {})[f"{width}x{height}"] = key
                labels[index] = label
                seen += 1
    return {"keys": keys, "labels": labels, "scale": scale, "encoded": encoded, "seen": seen}


def _image_batches(datamodule: ImageDataModule, ranks: Ranks, description: str):
    """This rank's share of the batches the caches encode (every image at each resolution the latents are keyed by),
    with each image's key, under a progress bar on rank 0."""
    batches = datamodule.encoding_batches()[ranks.rank :: ranks.world_size]
    loader = DataLoader(KeyedImages(datamodule.pixel_dataset()), batch_sampler=batches,
                        num_workers=datamodule.num_workers)
    return tqdm(loader, desc=description, unit="batch", dynamic_ncols=True, disable=ranks.rank != 0)


@contextmanager
def _on(network: nn.Module, device: torch.device):
    """``network`` moved to ``device`` for the block, then back."""
    original = next(network.parameters()).device
    network.to(device)
    try:
        yield network
    finally:
        network.to(original)


def _merge(shares: list[dict], num_images: int, kind: str) -> tuple[list[dict], list[int], LatentScale, int, int]:
    """The ranks' shares as one: keys and labels per image in index order, the latent scale, the counts."""
    keys: list[dict[str, str]] = [{} for _ in range(num_images)]
    labels = [-1] * num_images
    scale = LatentScale(kind)
    for share in shares:
        for index, by_resolution in share["keys"].items():
            keys[index].update(by_resolution)
            labels[index] = share["labels"][index]
        scale.add(share["scale"])
    return keys, labels, scale, sum(s["encoded"] for s in shares), sum(s["seen"] for s in shares)


@torch.no_grad()
def encode_text_cache(tokenizer, text_encoder: nn.Module, datamodule: ImageDataModule, root: str | os.PathLike,
                      device: torch.device | None = None, ranks: Ranks = Ranks(), batch_size: int = 64) -> LatentCache:
    """Encode every caption of ``datamodule``'s images (every one of an image's several) and the empty prompt, as
    the pipeline encodes prompts (``encode_prompt``), into the cache of this encoder under ``root``, those it lacks
    only, on ``device``; every rank takes every ``world_size``-th batch. Refused before any encoding when the
    embeddings would not fit the disk's free space. Point the datamodule at the cache and return it."""
    cache = LatentCache(root, fingerprint(text_cache_description(tokenizer, text_encoder), text_encoder))
    captions = sorted({"", *(caption for options in datamodule.index.captions for caption in options)})
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with folder_lock(cache.dir) if ranks.rank == 0 else nullcontext():
        ranks.barrier()
        cache.refresh()
        missing = [caption for caption in captions if text_key(caption) not in cache]
        per_caption = _bytes_per_caption(tokenizer, text_encoder)
        _check_free_disk(cache.dir, len(missing) * per_caption, len(missing))
        share = [missing[s : s + batch_size] for s in range(0, len(missing), batch_size)][ranks.rank :: ranks.world_size]
        with _on(text_encoder, device):
            for batch in tqdm(share, desc="text cache", unit="batch", dynamic_ncols=True, disable=ranks.rank != 0):
                condition = encode_prompt(tokenizer, text_encoder, batch)
                for row, caption in enumerate(batch):
                    key = text_key(caption)
                    cache.add(key, condition["encoder_hidden_states"][row])
                    if "encoder_attention_mask" in condition:
                        cache.add(f"{key}.mask", condition["encoder_attention_mask"][row])
        cache.flush()
        ranks.barrier()
    cache.refresh()
    per_image = per_caption * len(captions) / max(1, len(datamodule.index.captions))
    log.info("text cache %s: %d captions (the empty prompt among them), %d encoded, %d already there; %.1f KB per "
             "caption, %.1f KB per image", cache.dir, len(captions), len(missing), len(captions) - len(missing),
             per_caption / 1e3, per_image / 1e3)
    datamodule.use_text_cache(cache)
    return cache


@torch.no_grad()
def encode_feature_cache(encoder: ImageEncoder, datamodule: ImageDataModule, root: str | os.PathLike,
                         device: torch.device | None = None, ranks: Ranks = Ranks()) -> LatentCache:
    """REPA's targets for a latent-cached data set, whose batches hold no pixels: ``encoder``'s patch features of
    every image the latent cache holds, under its keys (the same crop, the same bucket and leftover resolutions),
    in float16, those the cache of this encoder under ``root`` lacks only, on ``device``; every rank takes every
    ``world_size``-th batch. Point the datamodule at the cache and return it."""
    cache = LatentCache(root, fingerprint(encoder.describe(), encoder))
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoded = seen = 0
    with folder_lock(cache.dir) if ranks.rank == 0 else nullcontext():
        ranks.barrier()
        cache.refresh()
        with _on(encoder, device):
            for batch in _image_batches(datamodule, ranks, "feature cache"):
                missing = [i for i, key in enumerate(batch["key"]) if key not in cache]
                if missing:
                    features = encoder(batch["pixel_values"][missing].to(device)).half().cpu()
                    for row, i in enumerate(missing):
                        cache.add(batch["key"][i], features[row])
                encoded += len(missing)
                seen += len(batch["key"])
        cache.flush()
        ranks.barrier()
    cache.refresh()
    key = datamodule.latent_keys[0][next(iter(datamodule.latent_keys[0]))]
    feature_bytes = cache.get(key).nbytes
    latent_bytes = datamodule.latent_cache.get(key).nbytes
    log.info("feature cache %s: %d images encoded by this process, %d seen; %.1f KB per sample (%.3gx its cached "
             "latent moments' %.1f KB)", cache.dir, encoded, seen, feature_bytes / 1e3, feature_bytes / latent_bytes,
             latent_bytes / 1e3)
    datamodule.use_feature_cache(cache)
    return cache


def text_cache_description(tokenizer, text_encoder: nn.Module) -> dict:
    """What makes a text encoder's embeddings (with its weights, the text cache's key): the model's id, revision and
    config, the tokenizer's model, the context length, the dtype and the padding mask."""
    config = text_encoder.config
    return {"kind": "text_embeddings", "class_name": type(text_encoder).__name__,
            "pretrained_model_name_or_path": config._name_or_path, "revision": getattr(config, "_commit_hash", None),
            "config": config.to_dict(), "tokenizer": tokenizer.backend_tokenizer.to_str(),
            "max_length": tokenizer.model_max_length, "dtype": str(next(text_encoder.parameters()).dtype),
            "masks_padding": masks_padding(text_encoder)}


def _bytes_per_caption(tokenizer, text_encoder: nn.Module) -> int:
    """The bytes one caption's cached embedding (and mask) takes."""
    tokens, width = tokenizer.model_max_length, embedding_width(text_encoder)
    itemsize = next(text_encoder.parameters()).element_size()
    return tokens * width * itemsize + (tokens * 8 if masks_padding(text_encoder) else 0)


def _check_free_disk(folder: Path, needed: int, count: int) -> None:
    """Refuse a cache of ``needed`` bytes that the disk holding ``folder`` has no room for."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise ConfigError(f"the text cache needs {needed / 1e9:.2f} GB in {folder} for {count} captions, and its disk "
                          f"has {free / 1e9:.2f} GB free: set paths.latent_cache to a folder on a larger disk, or "
                          f"model.text_cache=false to encode the captions at every step instead")
