"""Image files -> batches of ``{"pixel_values": (N, 3, H, W) in [-1, 1]}`` for the autoencoder stages."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, Sampler

from ldm_lab.data.sources import FolderSource
from ldm_lab.data.transforms import image_transform

log = logging.getLogger(__name__)


class ImageFiles(Dataset):
    """Decodes one file per item, EXIF-rotated and converted to RGB. A file that fails to decode
    (truncated after the header check) is logged and replaced by the next one."""

    def __init__(self, files: list[Path], transform):
        self.files = files
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        for offset in range(len(self.files)):
            path = self.files[(index + offset) % len(self.files)]
            try:
                with Image.open(path) as image:
                    image = ImageOps.exif_transpose(image).convert("RGB")
            except OSError as error:
                log.warning("skipping %s: cannot decode (%s)", path, error)
                continue
            return {"pixel_values": self.transform(image)}
        raise RuntimeError("no file of the data set could be decoded")


class SeededShuffleSampler(Sampler[int]):
    """A permutation drawn from (seed, epoch) alone, so a resumed run sees the order a straight run
    would. Lightning calls ``set_epoch`` at the start of every epoch. ``resume_epoch`` and
    ``resume_offset`` drop the samples a stopped run had already used from that epoch; the length
    stays the full epoch's, which is what Lightning's progress counters expect on a resume."""

    def __init__(self, num_samples: int, seed: int, resume_epoch: int | None = None, resume_offset: int = 0):
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0
        self.resume_epoch = resume_epoch
        self.resume_offset = resume_offset

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples).tolist()
        if self.epoch == self.resume_epoch:
            order = order[self.resume_offset:]
        return iter(order)


class ImageDataModule(L.LightningDataModule):
    """Square crops of ``resolution`` from ``source``; ``num_val`` images (a seeded choice) held out."""

    def __init__(
        self,
        source: FolderSource,
        resolution: int = 256,
        batch_size: int = 8,
        num_val: int = 64,
        random_crop: bool = True,
        random_flip: bool = True,
        num_workers: int = 4,
        seed: int = 0,
        downsample_factor: int = 1,
    ):
        super().__init__()
        if resolution % downsample_factor:
            raise ValueError(
                f"data.resolution={resolution} is not divisible by the model's downsampling factor "
                f"{downsample_factor}; use a multiple of it, e.g. "
                f"data.resolution={max(downsample_factor, resolution // downsample_factor * downsample_factor)}"
            )
        self.source = source
        self.resolution = resolution
        self.batch_size = batch_size
        self.num_val = num_val
        self.random_crop = random_crop
        self.random_flip = random_flip
        self.num_workers = num_workers
        self.seed = seed
        self.train_set: ImageFiles | None = None
        self.val_set: ImageFiles | None = None
        self._resume: dict[str, int] = {}

    def prepare_data(self) -> None:
        self.source.prepare()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        files = self.source.files()
        if len(files) <= self.num_val:
            raise ValueError(f"{len(files)} images cannot spare data.num_val={self.num_val} for validation; "
                             f"lower data.num_val or add images")
        order = np.random.default_rng(self.seed).permutation(len(files))
        val_files = [files[i] for i in sorted(order[: self.num_val])]
        train_files = [files[i] for i in sorted(order[self.num_val:])]
        self.train_set = ImageFiles(train_files, image_transform(self.resolution, self.random_crop, self.random_flip))
        self.val_set = ImageFiles(val_files, image_transform(self.resolution, False, False))
        log.info("data: %d train and %d validation images from %s at %dx%d", len(train_files), len(val_files),
                 self.source.root, self.resolution, self.resolution)

    def _loader(self, dataset: ImageFiles, sampler: Sampler | None, drop_last: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            drop_last=drop_last,
        )

    def state_dict(self) -> dict[str, int]:
        """Where training stands in its epoch, saved in every checkpoint: a resumed run goes on with
        the batches the stopped one had left. (``processed`` also counts a batch whose checkpoint was
        written from ``on_train_batch_end``, before Lightning marked it completed.)"""
        if self.trainer is None:
            return {}
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
        return {"epoch": self.trainer.current_epoch, "batches_done": progress.processed}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._resume = dict(state_dict)

    def train_dataloader(self) -> DataLoader:
        sampler = SeededShuffleSampler(len(self.train_set), self.seed, resume_epoch=self._resume.get("epoch"),
                                       resume_offset=self._resume.get("batches_done", 0) * self.batch_size)
        return self._loader(self.train_set, sampler, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, None, drop_last=False)
