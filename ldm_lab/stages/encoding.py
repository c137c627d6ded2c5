"""Encoding a data set into the latent cache with a frozen first stage (LDM, Rombach et al. 2022, sec. 3):
what task=cache_latents, and task=train with ``model.latent_cache=true``, run before training. The
datamodule then only reads the cache (ldm_lab/data/latent_cache.py stores it)."""

from __future__ import annotations

import logging
import os

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ldm_lab.data.datamodule import ImageDataModule
from ldm_lab.data.latent_cache import KeyedImages, LatentCache
from ldm_lab.io.atomic import folder_lock
from ldm_lab.nn.frozen_autoencoder import FrozenAutoencoder, LatentScale

log = logging.getLogger(__name__)


@torch.no_grad()
def encode_latent_cache(first_stage: FrozenAutoencoder, datamodule: ImageDataModule, root: str | os.PathLike) -> dict:
    """Encode every image of ``datamodule`` the cache under ``root`` lacks, at its bucket resolution (center
    crop, no flip) and, with buckets, at the leftover resolution too; write the manifest (per image, its
    key at each resolution and, for labelled data, the class of the image encoded, which for an image that
    cannot be decoded is its replacement's; the latent scale over the training images at their bucket resolution), point
    the datamodule at the cache and return the manifest. Runs on the GPU when there is one."""
    cache = LatentCache(root, first_stage.fingerprint())
    datamodule.prepare_data()  # the sources write or download their images once
    datamodule.setup_index()
    with folder_lock(cache.dir):  # jobs sharing the cache take turns: each latent is encoded once
        cache.refresh()  # what another job wrote while this one waited
        is_val = datamodule.is_val
        original = next(first_stage.parameters()).device
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        first_stage.to(device)
        keys: list[dict[str, str]] = [{} for _ in range(len(is_val))]
        labels = [-1] * len(is_val)  # the class of the image each entry was encoded from (a replacement's own)
        scale = LatentScale(first_stage.kind)
        encoded = seen = 0
        loader = DataLoader(KeyedImages(datamodule.pixel_dataset()), batch_sampler=datamodule.encoding_batches(),
                            num_workers=datamodule.num_workers)
        try:
            for batch in tqdm(loader, desc="latent cache", unit="batch", dynamic_ncols=True):
                missing = [i for i, key in enumerate(batch["key"]) if key not in cache]
                if missing:
                    moments = first_stage.moments(batch["pixel_values"][missing].to(device)).float().cpu()
                    for row, i in enumerate(missing):
                        cache.add(batch["key"][i], moments[row])
                    encoded += len(missing)
                height, width = batch["pixel_values"].shape[2:]
                served = batch["class_labels"].tolist() if "class_labels" in batch else [-1] * len(batch["key"])
                for key, index, label in zip(batch["key"], batch["index"].tolist(), served, strict=True):
                    if not keys[index] and not is_val[index]:
                        scale.update(cache.get(key))
                    keys[index][f"{width}x{height}"] = key
                    labels[index] = label
                    seen += 1
        finally:
            first_stage.to(original)
        cache.flush()
        manifest = {"kind": first_stage.kind, "scaling_factor": scale.scaling_factor, "keys": keys}
        if datamodule.class_names is not None:
            manifest["labels"] = labels
        cache.write_manifest(datamodule.data_key(), manifest)
    log.info("latent cache %s: %d latents encoded, %d already there; latent scale 1/std = %.5f", cache.dir,
             encoded, seen - encoded, manifest["scaling_factor"])
    datamodule.use_latent_cache(cache, manifest)
    return manifest


def attach_latent_cache(first_stage: FrozenAutoencoder, datamodule: ImageDataModule, root: str | os.PathLike) -> None:
    """Before training: each node's first process encodes what the cache lacks; under DDP the others, which
    Lightning starts later, read the manifest it wrote (in the datamodule's setup)."""
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        encode_latent_cache(first_stage, datamodule, root)
    else:
        datamodule.use_latent_cache(LatentCache(root, first_stage.fingerprint()))
