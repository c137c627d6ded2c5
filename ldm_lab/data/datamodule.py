"""Images -> batches of ``{"pixel_values": (N, 3, H, W) in [-1, 1], "index": (N,)}``, one resolution
per batch; ``index`` is each image's position in the datamodule's index. Labelled data adds ``"class_labels":
(N,)``, each image's class id, and captioned data ``"captions"``, a list of N strings (the latent cache's batches
too, with the text cache also their ``"encoder_hidden_states"`` and, for a T5 encoder, ``"encoder_attention_mask"``).

Square training (``buckets: null``) is one bucket of ``resolution`` x ``resolution``; with ``buckets``
every image trains at the aspect-ratio bucket nearest its own shape (seed 002).
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ldm_lab.core.errors import ConfigError
from ldm_lab.data.buckets import BucketBatchSampler, Item, assign_buckets, bucket_resolutions
from ldm_lab.data.captions import CaptionPicker
from ldm_lab.data.images import to_rgb
from ldm_lab.data.index import ImageIndex
from ldm_lab.data.latent_cache import CachedLatents, LatentCache, data_fingerprint
from ldm_lab.data.sources import FolderSource
from ldm_lab.data.transforms import bucket_transform

log = logging.getLogger(__name__)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGINT (Ctrl-C reaches the whole process group) and SIGTERM (a scheduler's)
    to the main process, which checkpoints and then shuts them down (ldm_lab/callbacks/stop_signals.py)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@dataclass
class BucketConfig:
    """Aspect-ratio buckets (seed 002): the values, NovelAI's among them, live in conf/data/buckets/."""

    max_area: int
    min_side: int
    max_side: int
    step: int
    base_side: int | None
    max_ar_error: float  # |log aspect| error to the nearest bucket above which an image is skipped
    no_upscale: bool

    @classmethod
    def of(cls, values: Mapping) -> BucketConfig:
        missing = [f.name for f in fields(cls) if f.name not in values]
        if missing:
            raise ConfigError(f"data.buckets lacks {', '.join(missing)}: start from a bucket set and change its keys, "
                              f"e.g. +data/buckets=novelai data.buckets.max_area=65536")
        return cls(**values)


class BucketedImages(Dataset):
    """Items are :class:`~ldm_lab.data.buckets.Item`: image ``index`` of the index, at that size. Images
    from ``boundary`` on come from ``val_source`` when there is one (a data set's own validation split).
    Random crops and flips are drawn from (seed, epoch, image): the same whatever the workers, ranks or
    resumes, and new each epoch. ``caption(index, epoch)``: a captioned image's caption."""

    def __init__(self, source: FolderSource, index: ImageIndex, random_crop: bool, random_flip: bool,
                 val_source: FolderSource | None = None, boundary: int | None = None, seed: int = 0,
                 caption: Callable[[int, int], str] | None = None):
        self.sources = (source, val_source)
        self.boundary = len(index) if boundary is None else boundary
        self.locations = index.locations
        self.labels = index.labels
        self.random_crop = random_crop
        self.random_flip = random_flip
        self.seed = seed
        self.caption = caption

    def __len__(self) -> int:
        return len(self.locations)

    def _augmentation_generator(self, item: Item) -> torch.Generator | None:
        if not (self.random_crop or self.random_flip):
            return None
        seed = np.random.SeedSequence([self.seed, item.epoch, item.index]).generate_state(1)[0]
        return torch.Generator().manual_seed(int(seed))

    def __getitem__(self, item: tuple) -> dict[str, torch.Tensor]:
        item = Item(*item)
        index, height, width = item.index, item.height, item.width
        for offset in range(len(self.locations)):
            position = (index + offset) % len(self.locations)
            location = self.locations[position]
            try:
                with self.sources[position >= self.boundary].open(location) as image:
                    image = to_rgb(image)
            except (OSError, Image.DecompressionBombError) as error:  # passed the header checks, failed to decode
                log.warning("skipping %s: cannot decode (%s)", location, error)
                continue
            pixels = bucket_transform(image, (height, width), self.random_crop, self.random_flip,
                                      self._augmentation_generator(item))
            sample = {"pixel_values": pixels, "index": index}
            if self.labels is not None:  # the label of the image served: a replacement brings its own
                sample["class_labels"] = int(self.labels[position])
            if self.caption is not None:
                sample["captions"] = self.caption(position, item.epoch)
            return sample
        raise ConfigError("no image of the data set could be decoded")


class ImageDataModule(L.LightningDataModule):
    """Indexes ``source``, assigns buckets, holds out ``num_val`` images (a seeded choice; below 1, a
    fraction of the usable images) or takes them from ``val_source``, and batches each rank's share
    with :class:`~ldm_lab.data.buckets.BucketBatchSampler`. Captioned data: ``shuffle_caption`` and
    ``keep_tokens`` as :class:`~ldm_lab.data.captions.CaptionPicker` takes them."""

    def __init__(
        self,
        source: FolderSource,
        val_source: FolderSource | None = None,
        resolution: int = 256,
        buckets: BucketConfig | dict | None = None,
        batch_size: int = 8,
        num_val: float = 64,
        random_crop: bool = True,
        random_flip: bool = True,
        min_image_side: int = 0,
        max_image_pixels: int = 89_478_485,
        max_images: int | None = None,
        num_workers: int = 4,
        seed: int = 0,
        cache_dir: str | os.PathLike | None = None,
        downsample_factor: int = 1,
        shuffle_caption: bool = False,
        keep_tokens: int = 0,
    ):
        super().__init__()
        self.source = source
        self.val_source = val_source
        self.buckets = BucketConfig.of(buckets) if isinstance(buckets, Mapping) else buckets
        if self.buckets is None:
            self.resolutions = [(resolution, resolution)]
            self.leftover_resolution = (resolution, resolution)
            self.max_ar_error = float("inf")
        else:
            b = self.buckets
            self.resolutions = bucket_resolutions(b.max_area, b.min_side, b.max_side, b.step, b.base_side)
            self.leftover_resolution = min(self.resolutions, key=lambda hw: (abs(np.log(hw[1] / hw[0])), -hw[1]))
            self.max_ar_error = b.max_ar_error
        self.resolution = resolution
        self.check_downsample_factor(downsample_factor)
        self.batch_size = batch_size
        self.num_val = num_val
        self.random_crop = random_crop
        self.random_flip = random_flip
        self.min_image_side = min_image_side
        self.max_image_pixels = max_image_pixels
        Image.MAX_IMAGE_PIXELS = max_image_pixels  # PIL's decompression-bomb limit (its default), for decoding too
        self.max_images = max_images
        self.num_workers = num_workers
        self.seed = seed
        self.cache_dir = cache_dir
        self.shuffle_caption = shuffle_caption
        self.keep_tokens = keep_tokens
        self.index: ImageIndex | None = None
        self._resume: dict[str, int] = {}
        self.latent_cache: LatentCache | None = None  # set by use_latent_cache: batches then carry cached latents
        self.latent_keys: list[dict[str, str]] | None = None
        self.text_cache: LatentCache | None = None  # set by use_text_cache: cached batches then carry caption embeddings
        self.feature_cache: LatentCache | None = None  # set by use_feature_cache: cached batches then carry image features
        self.latent_labels: np.ndarray | None = None
        self.latent_scale: float | None = None

    def check_downsample_factor(self, downsample_factor: int) -> None:
        """Every training resolution must divide by the model's downsampling factor."""
        bad = [hw for hw in self.resolutions if hw[0] % downsample_factor or hw[1] % downsample_factor]
        if bad:
            key = "data.resolution" if self.buckets is None else "data.buckets.step/min_side/max_side"
            raise ConfigError(
                f"{key} gives {bad[0][1]}x{bad[0][0]}, not divisible by the model's downsampling factor "
                f"{downsample_factor}; use multiples of it (e.g. data.resolution="
                f"{max(downsample_factor, self.resolution // downsample_factor * downsample_factor)})"
            )

    def prepare_data(self) -> None:
        self.source.prepare()
        if self.val_source is not None:
            self.val_source.prepare()

    # ---------------------------------------------------------------------------------- latent cache
    def use_latent_cache(self, cache: LatentCache, manifest: dict) -> None:
        """Serve ``{"latents": moments, "index"}`` batches from ``cache``, which ldm_lab/stages/encoding.py
        filled, by its ``manifest`` for this data: the keys, the latent scale and (labelled data) the class each
        cached latent was encoded from."""
        self.latent_cache = cache
        self.latent_keys, self.latent_scale = manifest["keys"], manifest["scaling_factor"]
        self.latent_labels = np.asarray(manifest["labels"], dtype=np.int64) if "labels" in manifest else None

    def use_text_cache(self, cache: LatentCache) -> None:
        """Cached batches also carry their captions' embeddings from ``cache``, which ldm_lab/stages/encoding.py
        filled (ldm_lab/data/latent_cache.py ``text_condition``)."""
        self.text_cache = cache

    def use_feature_cache(self, cache: LatentCache) -> None:
        """Cached batches also carry their images' ``image_features`` from ``cache``, which ldm_lab/stages/encoding.py
        filled under the latents' keys."""
        self.feature_cache = cache

    def data_key(self) -> str:
        """Names this data configuration's manifest: its images and the resolution each is encoded at, as
        (width, height) pairs: the order caches were first keyed in, so they keep reading."""
        self.setup_index()
        sizes = np.asarray(self.resolutions)[self.image_buckets][:, ::-1]
        return data_fingerprint(self.index.locations, np.concatenate([sizes, [self.leftover_resolution[::-1]]]))

    def encoding_batches(self) -> list[list[tuple[int, int, int]]]:
        """Batches of ``(index, height, width)`` covering every image at its bucket resolution and, with
        buckets, at the leftover resolution too: what the latent cache encodes."""
        self.setup_index()
        batches = []
        for bucket, (height, width) in enumerate(self.resolutions):
            members = np.flatnonzero(self.image_buckets == bucket).tolist()
            batches += [[(i, height, width) for i in members[s : s + self.batch_size]]
                        for s in range(0, len(members), self.batch_size)]
        if self.buckets is not None:
            height, width = self.leftover_resolution
            others = [i for i in range(len(self.index)) if self.resolutions[self.image_buckets[i]]
                      != self.leftover_resolution]
            batches += [[(i, height, width) for i in others[s : s + self.batch_size]]
                        for s in range(0, len(others), self.batch_size)]
        return batches

    def pixel_dataset(self) -> Dataset:
        """Every image as pixels, center-cropped and unflipped, with its first caption (latent cache, FID
        references, previews)."""
        return BucketedImages(self.source, self.index, False, False, self.val_source, self.boundary, self.seed,
                              self._caption(train=False))

    def _usable(self, source: FolderSource) -> tuple[ImageIndex, np.ndarray]:
        """The source's images that fit a bucket (with the skipped ones counted by reason), and their buckets."""
        index = source.index(self.cache_dir)
        too_small = np.minimum(index.widths, index.heights) < self.min_image_side
        assignment = assign_buckets(index.widths, index.heights, self.resolutions, self.max_ar_error,
                                    self.buckets is not None and self.buckets.no_upscale)
        too_small |= assignment.too_small
        too_large = index.widths * index.heights > self.max_image_pixels
        too_small &= ~too_large
        skipped = index.skipped.copy()
        for reason, mask in ((f"too large (over data.max_image_pixels={self.max_image_pixels} pixels)", too_large),
                             (f"too small (short side < {self.min_image_side} px or no bucket fits)", too_small),
                             (f"too extreme (aspect > {self.max_ar_error:.2f} from every bucket, in log units)",
                              assignment.too_extreme & ~too_small & ~too_large)):
            if mask.any():
                skipped[reason] += int(mask.sum())
        keep = ~too_small & ~too_large & (assignment.bucket >= 0)
        usable = index.select(keep)
        usable.skipped = skipped
        log.info("%s", usable.report(source.name))
        return usable, assignment.bucket[keep]

    def setup(self, stage: str | None = None) -> None:
        self.setup_index()

    def setup_index(self) -> None:
        """Index the sources, assign buckets and hold out the validation images (once)."""
        if self.index is not None:
            return
        train, train_buckets = self._usable(self.source)
        if self.max_images is not None and len(train) > self.max_images:  # a quick trial on a subset
            keep = np.arange(self.max_images) if train.labels is None else _every_class(train.labels, self.max_images)
            train, train_buckets = train.select(keep), train_buckets[keep]
            log.info("data.max_images=%d: using the first %d usable images%s", self.max_images, self.max_images,
                     "" if train.labels is None else " taken from every class in turn")
        rng = np.random.default_rng(self.seed)
        if 0 < self.num_val < 1:  # a fraction
            self.num_val = max(1, round(self.num_val * len(train)))
        self.num_val = int(self.num_val)
        if self.val_source is None:  # a seeded hold-out of the source
            if len(train) <= self.num_val:
                raise ConfigError(f"{len(train)} usable images cannot spare data.num_val={self.num_val} for "
                                  f"validation; lower data.num_val or add images")
            self.index, self.image_buckets, self.boundary = train, train_buckets, len(train)
            self.is_val = np.zeros(len(train), dtype=bool)
            self.is_val[rng.permutation(len(train))[: self.num_val]] = True
        else:  # the data set's own validation split: up to num_val of it, a seeded choice
            val, val_buckets = self._usable(self.val_source)
            if train.labels is not None:  # its classes by name, as the training split numbers them
                val, val_buckets = _in_classes_of(train, val, val_buckets, self.val_source.name)
            chosen = np.sort(rng.permutation(len(val))[: self.num_val])
            self.index = train.concatenated(val.select(chosen))
            self.image_buckets = np.concatenate([train_buckets, val_buckets[chosen]])
            self.boundary = len(train)
            self.is_val = np.arange(len(self.index)) >= len(train)
        log.info("%d train, %d validation images; %s", (~self.is_val).sum(), self.is_val.sum(),
                 self.describe_buckets())
        if self.class_names is not None:
            self._report_classes()

    @property
    def captioned(self) -> bool:
        """Whether the images have captions (batches then carry ``"captions"``), after ``setup_index``."""
        return self.index is not None and self.index.captions is not None

    def _caption(self, train: bool) -> CaptionPicker | None:
        """(image, epoch) -> the caption a batch carries: drawn in training, the first one in validation."""
        if not self.captioned:
            return None
        return CaptionPicker(self.index.captions, self.seed, train, self.shuffle_caption, self.keep_tokens)

    @property
    def class_names(self) -> list[str] | None:
        """The classes of labelled data (ids are positions), after ``setup_index``; None for unlabelled data."""
        return self.index.class_names if self.index is not None else None

    def _report_classes(self) -> None:
        counts = np.bincount(self.index.labels[~self.is_val], minlength=len(self.class_names))
        log.info("%d classes, %d-%d training images each", len(counts), counts.min(), counts.max())
        empty = [name for name, count in zip(self.class_names, counts, strict=True) if count == 0]
        if empty:
            log.warning("%d classes have no usable training image (a model learns nothing of them): %s",
                        len(empty), ", ".join(empty[:10]) + (", ..." if len(empty) > 10 else ""))

    def describe_buckets(self) -> str:
        if self.buckets is None:
            return f"square crops of {self.resolution}x{self.resolution}"
        used = np.unique(self.image_buckets).size
        return f"{used} of {len(self.resolutions)} aspect-ratio buckets in use"

    # ---------------------------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, int]:
        """Where training stands in its epoch, saved in every checkpoint: a resumed run goes on with
        the batches the stopped one had left. (``processed`` also counts a batch whose checkpoint was
        written from ``on_train_batch_end``, before Lightning marked it completed.)"""
        if self.trainer is None:
            return {}
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
        return {"epoch": self.trainer.current_epoch, "batches_done": progress.processed,
                "batch_size": self.batch_size, "world_size": self.trainer.world_size}

    def check_resume(self, state: dict | None, path, world_size: int) -> None:
        """A resume goes on with the batches its epoch had left, counted in batches of the stopped run's size on
        its number of processes: with another size or count it would skip or repeat images (and an LDM would
        scale its learning rate anew while its optimizer holds the old one). Refused, naming the setting."""
        if not state or "batch_size" not in state:  # written before checkpoints said
            return
        settings = [("data.batch_size", state["batch_size"], self.batch_size),
                    ("processes (trainer.devices x trainer.num_nodes)", state["world_size"], world_size)]
        for key, trained, given in settings:
            if trained != given:
                raise ConfigError(
                    f"ckpt_path={path} was trained with {key} = {trained}, this run gives {given}: its place in the "
                    f"epoch counts batches of that size on that many processes, and a latent diffusion model's "
                    f"learning rate was scaled by them. Resume with {key} = {trained}, or start a new run from its "
                    f"weights: model.pretrained={path} (an autoencoder) or model.denoiser_pretrained={path} (a latent "
                    f"diffusion model)")

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._resume = dict(state_dict)

    # ---------------------------------------------------------------------------------- loaders
    def _sampler(self, train: bool) -> BucketBatchSampler:
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if train and self.trainer else (1, 0)
        return BucketBatchSampler(
            np.where(self.is_val != train, self.image_buckets, -1), self.resolutions, self.batch_size,
            self.leftover_resolution, num_replicas=world, rank=rank, seed=self.seed, shuffle=train, drop_last=train)

    def _dataset(self, train: bool) -> Dataset:
        caption = self._caption(train)
        if self.latent_keys is not None:
            labels = self.latent_labels if self.latent_labels is not None else self.index.labels
            return CachedLatents(self.latent_cache, self.latent_keys, labels, caption, self.text_cache,
                                 self.feature_cache)
        return BucketedImages(self.source, self.index, train and self.random_crop, train and self.random_flip,
                              self.val_source, self.boundary, self.seed, caption)

    def _loader(self, train: bool) -> DataLoader:
        sampler = self._sampler(train)
        if train and self._resume:
            sampler.load_state_dict({"epoch": self._resume["epoch"], "start_batch": self._resume["batches_done"]})
        dataset = self._dataset(train)
        return DataLoader(dataset, batch_sampler=sampler, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available(),
                          worker_init_fn=ignore_stop_signals)

    def train_dataloader(self) -> DataLoader:
        return self._loader(train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(train=False)

    def reference_dataloader(self) -> DataLoader:
        """Every training image, center-cropped and unflipped, in index order on one process: the real
        images a generative model's FID compares with."""
        sampler = BucketBatchSampler(np.where(self.is_val, -1, self.image_buckets), self.resolutions, self.batch_size,
                                     self.leftover_resolution, shuffle=False, drop_last=False)
        return DataLoader(self.pixel_dataset(), batch_sampler=sampler,
                          num_workers=self.num_workers)

    def preview_captions(self, count: int) -> list[str]:
        """The first captions of the first ``count`` validation images (fixed prompts for previews)."""
        return [self.index.captions[i][0] for i in np.flatnonzero(self.is_val)[:count]]

    def preview_images(self, count: int) -> torch.Tensor:
        """The first ``count`` validation images, center-cropped to the leftover (near-square)
        resolution: the same pictures at every step, for image grids."""
        dataset = self.pixel_dataset()
        height, width = self.leftover_resolution
        return torch.stack([dataset[(int(i), height, width)]["pixel_values"]
                            for i in np.flatnonzero(self.is_val)[:count]])


def _every_class(labels: np.ndarray, count: int) -> np.ndarray:
    """Positions of ``count`` images taken from every class in turn (each class's in index order), sorted:
    a subset that keeps every class instead of the first classes' images."""
    rank = np.empty(len(labels), dtype=np.int64)  # an image's place within its class
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        rank[members] = np.arange(len(members))
    order = np.lexsort((labels, rank))  # first of every class, then second of every class, ...
    return np.sort(order[:count])


def _in_classes_of(train: ImageIndex, val: ImageIndex, val_buckets: np.ndarray,
                   name: str) -> tuple[ImageIndex, np.ndarray]:
    """``val`` with its labels renumbered by class name as ``train`` numbers them; images of a class the
    training split lacks are skipped and named."""
    position = {class_name: i for i, class_name in enumerate(train.class_names)}
    mapping = np.array([position.get(class_name, -1) for class_name in val.class_names], dtype=np.int64)
    unknown = sorted({val.class_names[label] for label in val.labels if mapping[label] < 0})
    if unknown:
        log.warning("%s: images of classes the training split does not have are skipped: %s", name,
                    ", ".join(unknown[:10]) + (", ..." if len(unknown) > 10 else ""))
    labels = mapping[val.labels]
    known = labels >= 0
    relabelled = ImageIndex(val.locations, val.widths, val.heights, val.skipped, labels, train.class_names)
    return relabelled.select(known), val_buckets[known]
