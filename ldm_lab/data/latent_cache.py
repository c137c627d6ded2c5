"""The caches of frozen networks' outputs, so the diffusion model trains without running them every step: the latent
cache (a data set encoded once by the first stage) and the text cache (each caption's embedding by a frozen text
encoder). This module stores and reads them; the encoding runs in ldm_lab/stages/encoding.py, so the data layer
never holds a model. Both are :class:`LatentCache` folders named by the network's fingerprint
(ldm_lab/core/fingerprint.py), their entries keyed by the input.

Latents: ``<root>/<first-stage fingerprint>/shard-<sha256>.safetensors`` holds one tensor per image (the
first stage's moments at the image's bucket resolution, center crop, no flip), named by the SHA-1 of the
image's pixels at that resolution: a changed image or first stage gets a new key and is encoded again,
an unchanged one is skipped. A shard is named by the SHA-256 of its bytes, checked when the cache is
opened: a damaged shard (a flipped bit, a truncated copy) is set aside and its images encoded again.
With aspect-ratio buckets an image is also stored at the leftover resolution, which the bucket sampler
gives the remainders of each epoch. ``manifest-<data key>.json`` lists, for one data configuration, each
image's key in index order and the latent scale, 1 / std of the training images' latents (LDM, sec.
4.3.2 and D.1; for KL moments the std of a posterior sample, computed exactly from means and variances).

Text embeddings: ``<root>/<text-encoder fingerprint>/shard-<sha256>.safetensors`` holds per caption (the empty
prompt among them) its embedding, named by the SHA-1 of its text, and, for an encoder that masks its padding, its
attention mask as ``<key>.mask``: a changed caption is encoded again on the next run.

Image features (REPA's targets): ``<root>/<image-encoder fingerprint>/shard-<sha256>.safetensors`` holds per image
and resolution the encoder's patch features in float16, under the latents' key: the same crop and bucket.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch.utils.data import Dataset

from ldm_lab.core.atomic import atomic_write, atomic_write_text
from ldm_lab.core.errors import ConfigError
from ldm_lab.core.fingerprint import text_key
from ldm_lab.data.buckets import Item

log = logging.getLogger(__name__)


def pixel_key(pixel_values: torch.Tensor) -> str:
    """The cache key of one transformed image: a hash of its shape and pixels."""
    digest = hashlib.sha1(str(tuple(pixel_values.shape)).encode())
    digest.update(pixel_values.contiguous().numpy().tobytes())
    return digest.hexdigest()


class KeyedImages(Dataset):
    """Wraps a dataset of ``{"pixel_values", "index"}`` items, adding each image's :func:`pixel_key`."""

    def __init__(self, images: Dataset):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item):
        sample = self.images[item]
        sample["key"] = pixel_key(sample["pixel_values"])
        return sample


SHARD_NAME = re.compile(r"shard-([0-9a-f]{64})\.safetensors")


class LatentCacheError(ConfigError):
    """A cache file that cannot be used; the message names it and how to rebuild it."""


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def read_latents(shard: Path, key: str, handles: dict | None = None) -> torch.Tensor:
    """One tensor of a shard; ``handles`` keeps each shard open between calls (opening one costs about
    60 times reading a 16x16x8 tensor from it)."""
    try:
        if handles is None:
            with safe_open(shard, "pt") as handle:
                return handle.get_tensor(key)
        if shard not in handles:
            handles[shard] = safe_open(shard, "pt")
        return handles[shard].get_tensor(key)
    except (SafetensorError, OSError) as error:
        raise LatentCacheError(f"latent cache shard {shard} cannot be read ({error}): delete it and run "
                               f"task=cache_latents (or train) again to encode its images anew") from error


class LatentCache:
    """The shards of one first stage: a key -> shard map read from the shard headers, written to in shards
    of ``shard_size`` tensors (each written whole, atomically: a killed run keeps what it finished). Every
    shard is checked against the SHA-256 in its name once per process, before any of it is used."""

    def __init__(self, root: str | os.PathLike, fingerprint: str, shard_size: int = 1024):
        self.dir = Path(root) / fingerprint[:16]
        self.shard_size = shard_size
        self.shards: dict[str, Path] = {}
        self._checked: set[Path] = set()
        self._pending: dict[str, torch.Tensor] = {}
        self.refresh()

    def refresh(self) -> None:
        """Read the headers of shards not seen yet (another process may have written some), checking each."""
        for shard in sorted(self.dir.glob("shard-*.safetensors")):
            if shard in self._checked:
                continue
            match = SHARD_NAME.fullmatch(shard.name)
            if match is None:
                self._set_aside(shard, "has no checksum in its name (an older version wrote it)")
                continue
            if _file_sha256(shard) != match[1]:
                self._set_aside(shard, "does not match the checksum in its name")
                continue
            try:
                with safe_open(shard, "pt") as handle:
                    self.shards.update(dict.fromkeys(handle.keys(), shard))
            except (SafetensorError, OSError) as error:
                self._set_aside(shard, f"cannot be read ({error})")
                continue
            self._checked.add(shard)

    def _set_aside(self, shard: Path, problem: str) -> None:
        corrupt = shard.with_name(shard.name + ".corrupt")
        try:
            os.replace(shard, corrupt)
        except FileNotFoundError:  # another process set it aside first
            return
        log.warning("latent cache shard %s %s: moved to %s; its images are encoded again", shard, problem, corrupt.name)

    def __contains__(self, key: str) -> bool:
        return key in self.shards or key in self._pending

    def get(self, key: str) -> torch.Tensor:
        if key in self._pending:
            return self._pending[key]
        return read_latents(self.shards[key], key)

    def add(self, key: str, tensor: torch.Tensor) -> None:
        self._pending[key] = tensor.detach().cpu().contiguous()
        if len(self._pending) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        data = save(self._pending)
        path = self.dir / f"shard-{hashlib.sha256(data).hexdigest()}.safetensors"
        atomic_write(path, lambda file: file.write(data))
        self._checked.add(path)
        self.shards.update(dict.fromkeys(self._pending, path))
        self._pending = {}

    def manifest_path(self, data_key: str) -> Path:
        return self.dir / f"manifest-{data_key}.json"

    def write_manifest(self, data_key: str, manifest: dict) -> None:
        atomic_write_text(self.manifest_path(data_key), json.dumps(manifest))


def data_fingerprint(locations: list[str], sizes: np.ndarray) -> str:
    """Names the manifest of one data configuration: its images and the resolution each is encoded at."""
    digest = hashlib.sha1("\n".join(locations).encode())
    digest.update(np.ascontiguousarray(sizes, dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


def text_condition(shards: dict[str, Path], caption: str, handles: dict | None = None) -> dict[str, torch.Tensor]:
    """A caption's cached condition: ``encoder_hidden_states`` and, where its encoder masks padding,
    ``encoder_attention_mask`` (ldm_lab/diffusion/pipeline.py ``encode_prompt``'s, one caption)."""
    key = text_key(caption)
    if key not in shards:
        raise KeyError(f"the caption {caption[:60]!r} has no cached embedding; the text cache does not match the "
                       f"data: run training again to encode it")
    condition = {"encoder_hidden_states": read_latents(shards[key], key, handles)}
    if f"{key}.mask" in shards:
        condition["encoder_attention_mask"] = read_latents(shards[f"{key}.mask"], f"{key}.mask", handles)
    return condition


class CachedLatents(Dataset):
    """Items (:class:`~ldm_lab.data.buckets.Item`) -> ``{"latents": moments, "index"}``: the image's moments at
    that resolution, its ``class_labels`` when ``labels`` (the index's, by position) are given, its ``captions``
    (``caption(index, epoch)``) when captioned, that caption's cached condition (:func:`text_condition`)
    when a ``text_cache`` is given, and its ``image_features`` (an image encoder's, under the latents' key) when a
    ``feature_cache`` is given. Shards stay open (per process: a data loader worker opens its own)."""

    def __init__(self, cache: LatentCache, keys: list[dict[str, str]], labels: np.ndarray | None = None,
                 caption: Callable[[int, int], str] | None = None, text_cache: LatentCache | None = None,
                 feature_cache: LatentCache | None = None):
        self.shards = cache.shards
        self.keys = keys
        self.labels = labels
        self.caption = caption
        self.text_shards = None if text_cache is None else text_cache.shards
        self.feature_shards = None if feature_cache is None else feature_cache.shards
        self._handles: dict = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": {}}  # open files do not travel to spawned workers

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, item: tuple) -> dict[str, torch.Tensor]:
        index, height, width, epoch = Item(*item)
        key = self.keys[index].get(f"{width}x{height}")
        if key is None:
            raise KeyError(f"image {index} has no cached latents at {width}x{height}; the cache does not match "
                           f"the data configuration: run task=cache_latents again")
        sample = {"latents": read_latents(self.shards[key], key, self._handles), "index": index}
        if self.feature_shards is not None:
            if key not in self.feature_shards:
                raise KeyError(f"image {index} has no cached image features at {width}x{height}; the feature cache "
                               f"does not match the latent cache: train again to encode them")
            sample["image_features"] = read_latents(self.feature_shards[key], key, self._handles)
        if self.labels is not None:
            sample["class_labels"] = int(self.labels[index])
        if self.caption is not None:
            sample["captions"] = self.caption(index, epoch)
            if self.text_shards is not None:
                sample.update(text_condition(self.text_shards, sample["captions"], self._handles))
        return sample
