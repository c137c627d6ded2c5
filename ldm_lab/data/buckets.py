"""Aspect-ratio bucketing (NovelAI 2022, seed 002): every image trains at a resolution close to its own
shape, every batch holds one resolution. Resolutions are (height, width), as torch orders image sides;
written out (tables, cache keys) they read ``WxH``, as NovelAI lists its buckets.

Improvements over the original, as DESIGN.md lists them: aspect ratios are compared in log space (a
2:1 and a 1:2 image are equally far from square); every rank gets the same number of batches (else
DDP hangs); the sampler resumes mid-epoch. All of it is vectorized NumPy: assigning a million images
takes well under a second.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from torch.utils.data import Sampler

from ldm_lab.core.errors import ConfigError


def bucket_resolutions(
    max_area: int, min_side: int, max_side: int, step: int, base_side: int | None = None
) -> list[tuple[int, int]]:
    """NovelAI's bucket set as (height, width): for each width from ``min_side`` in steps of ``step``,
    the largest height (a multiple of ``step``, at most ``max_side``) with width x height <= ``max_area``;
    the same with the axes swapped; plus the square ``base_side`` x ``base_side``. Sorted by aspect
    (width / height), then width."""
    if min_side % step or max_side % step:
        raise ValueError(f"min_side={min_side} and max_side={max_side} must be multiples of step={step}")
    found = set()
    side = min_side
    while side <= max_side and side * min_side <= max_area:
        other = min_side
        while other + step <= max_side and side * (other + step) <= max_area:
            other += step
        found.update({(other, side), (side, other)})
        side += step
    if base_side is not None:
        found.add((base_side, base_side))
    return sorted(found, key=lambda hw: (hw[1] / hw[0], hw[1]))


@dataclass
class Assignment:
    """Per image: its bucket (-1 when pruned) and the |log aspect| error to that bucket."""

    bucket: np.ndarray  # int64, (N,)
    nearest: np.ndarray  # int64, (N,): the nearest bucket, pruned or not (-1 when none fits)
    error: np.ndarray  # float64, (N,)
    too_small: np.ndarray  # bool, (N,): no bucket fits inside it (no-upscale mode)
    too_extreme: np.ndarray  # bool, (N,): the nearest bucket's aspect is further than max_ar_error


def assign_buckets(
    widths: np.ndarray, heights: np.ndarray, resolutions: list[tuple[int, int]], max_ar_error: float,
    no_upscale: bool = False,
) -> Assignment:
    """Each image to the bucket (``resolutions``: (height, width)) nearest in log aspect ratio. ``max_ar_error`` is in log units
    (0.2 = about 22% off in aspect); images further than that are pruned. With ``no_upscale``, only
    buckets that fit inside the image are candidates, so no image is enlarged. Between buckets of the
    same aspect, the larger wins."""
    widths = np.asarray(widths, dtype=np.float64)
    heights = np.asarray(heights, dtype=np.float64)
    image_aspect = np.log(widths / heights)
    res = np.asarray(resolutions, dtype=np.float64)
    heights_res, widths_res = res[:, 0], res[:, 1]
    bucket_aspect = np.log(widths_res / heights_res)
    if no_upscale:  # candidates differ per image: compare with every bucket, larger ones first for ties
        by_area = np.argsort(-heights_res * widths_res, kind="stable")
        fits = (widths_res[None, by_area] <= widths[:, None]) & (heights_res[None, by_area] <= heights[:, None])
        distance = np.where(fits, np.abs(image_aspect[:, None] - bucket_aspect[None, by_area]), np.inf)
        bucket = by_area[distance.argmin(axis=1)]
        error = distance.min(axis=1)
    else:  # nearest of the two neighbours in the sorted aspects: O(N log buckets)
        order = np.lexsort((-heights_res * widths_res, bucket_aspect))  # by aspect, then larger area first
        first_of_aspect = np.r_[True, np.diff(bucket_aspect[order]) != 0]
        candidates = order[first_of_aspect]
        sorted_aspect = bucket_aspect[candidates]
        right = np.clip(np.searchsorted(sorted_aspect, image_aspect), 0, len(candidates) - 1)
        left = np.clip(right - 1, 0, len(candidates) - 1)
        take_left = np.abs(image_aspect - sorted_aspect[left]) <= np.abs(image_aspect - sorted_aspect[right])
        bucket = candidates[np.where(take_left, left, right)]
        error = np.abs(image_aspect - bucket_aspect[bucket])
    too_small = np.isinf(error)
    too_extreme = ~too_small & (error > max_ar_error)
    nearest = np.where(too_small, -1, bucket).astype(np.int64)
    return Assignment(bucket=np.where(too_extreme, -1, nearest), nearest=nearest, error=error, too_small=too_small,
                      too_extreme=too_extreme)


class Item(NamedTuple):
    """What a sampler hands a data set: image ``index`` at ``height`` x ``width``, drawn in ``epoch``
    (which, with the image and the run's seed, seeds the image's random crop and flip)."""

    index: int
    height: int
    width: int
    epoch: int = 0


class BucketBatchSampler(Sampler[list[Item]]):
    """Yields batches of :class:`Item`, one bucket resolution per batch.

    Per epoch (seed 002): one permutation of the kept images, the same on every rank, trimmed to a
    multiple of ``batch_size x num_replicas`` and sharded by rank; each bucket's share split into full
    batches, its remainder gathered into leftover batches (resized to ``leftover_resolution``); the
    next batch comes from a bucket chosen with probability proportional to the batches it has left.
    Everything is drawn from (seed, epoch, rank), so an epoch can be replayed exactly: ``state_dict``
    and ``load_state_dict`` carry (epoch, batches already taken) and a restored sampler yields exactly
    the batches that were left.
    """

    def __init__(
        self,
        buckets: np.ndarray,
        resolutions: list[tuple[int, int]],
        batch_size: int,
        leftover_resolution: tuple[int, int],
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
    ):
        self.buckets = np.asarray(buckets, dtype=np.int64)
        self.resolutions = list(resolutions)
        self.batch_size = batch_size
        self.leftover_resolution = leftover_resolution
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last  # False (validation, one rank): keep every image, the last batch may be short
        self.epoch = 0
        self.start_batch = 0  # batches of `epoch` already taken (resume)
        self.kept = np.flatnonzero(self.buckets >= 0)
        per_step = batch_size * num_replicas
        if not drop_last and num_replicas != 1:
            raise ValueError("drop_last=False is for one rank (validation)")
        if drop_last and len(self.kept) < per_step:
            raise ConfigError(f"{len(self.kept)} images cannot fill one batch of {batch_size} on {num_replicas} "
                              f"rank(s); lower data.batch_size or add images")
        self.num_batches = len(self.kept) // per_step if drop_last else None

    def __len__(self) -> int:
        return self.num_batches if self.drop_last else len(self.epoch_batches(0))

    @property
    def sampler(self) -> BucketBatchSampler:
        """Lightning sets the epoch, at the start of each, on a loader's ``sampler`` and on its batch
        sampler's ``sampler`` (``lightning.fabric.utilities.data._set_sampler_epoch``), never on the batch
        sampler itself: this is where it finds :meth:`set_epoch`."""
        return self

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.start_batch = epoch, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "start_batch": self.start_batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.start_batch = state["epoch"], state["start_batch"]

    def epoch_batches(self, epoch: int) -> list[tuple[np.ndarray, tuple[int, int]]]:
        """This rank's batches of ``epoch``, in order: (indices, (height, width))."""
        shared = np.random.default_rng([self.seed, epoch])  # the same on every rank
        order = shared.permutation(self.kept) if self.shuffle else self.kept
        if self.drop_last:
            order = order[: self.num_batches * self.batch_size * self.num_replicas]
        shard = order[self.rank :: self.num_replicas]
        by_bucket = np.argsort(self.buckets[shard], kind="stable")  # grouped, each in permutation order
        bucket_ids, counts = np.unique(self.buckets[shard], return_counts=True)
        groups, leftovers = [], []
        for members, bucket in zip(np.split(shard[by_bucket], np.cumsum(counts)[:-1]), bucket_ids, strict=True):
            full = len(members) - len(members) % self.batch_size
            groups.append((members[:full], self.resolutions[bucket]))
            leftovers.append(members[full:])
        leftover = np.concatenate(leftovers)
        if len(leftover):  # with drop_last a multiple of batch_size, since the shard and every full group are
            groups.append((leftover, self.leftover_resolution))
        # Choosing a group with probability proportional to its batches left, until all are drawn, is
        # a uniform shuffle of the multiset of group labels.
        labels = np.repeat(np.arange(len(groups)), [-(-len(m) // self.batch_size) for m, _ in groups])
        if self.shuffle:
            labels = np.random.default_rng([self.seed, epoch, self.rank]).permutation(labels)
        position = np.zeros(len(groups), dtype=np.int64)
        batches = []
        for group in labels.tolist():
            members, resolution = groups[group]
            start = position[group] * self.batch_size
            batches.append((members[start : start + self.batch_size], resolution))
            position[group] += 1
        return batches

    def __iter__(self) -> Iterator[list[Item]]:
        batches = self.epoch_batches(self.epoch)
        start = self.start_batch if self.start_batch < len(batches) else 0  # a finished epoch starts over
        for taken, (indices, (height, width)) in enumerate(batches[start:], start=start + 1):
            self.start_batch = taken  # what state_dict reports: batches of this epoch handed out
            yield [Item(int(i), height, width, self.epoch) for i in indices.tolist()]
