"""Aspect-ratio buckets: NovelAI's set, assignment, and a sampler that shards, balances and resumes."""

from __future__ import annotations

import numpy as np
import pytest

from ldm_lab.data.buckets import BucketBatchSampler, assign_buckets, bucket_resolutions

# NovelAI lists its buckets as width x height; the lab's resolutions are (height, width)
NOVELAI = [(256, 1024), (320, 1024), (384, 1024), (384, 960), (384, 896), (448, 832), (512, 768), (512, 704),
           (576, 640), (512, 512), (640, 576), (704, 512), (768, 512), (832, 448), (896, 384), (960, 384),
           (1024, 384), (1024, 320), (1024, 256)]


def test_novelai_defaults_give_its_bucket_set():
    resolutions = bucket_resolutions(512 * 768, 256, 1024, 64, base_side=512)
    assert sorted(resolutions) == sorted((h, w) for w, h in NOVELAI)
    assert resolutions[0] == (1024, 256) and resolutions[-1] == (256, 1024)  # the tallest first, by width / height


def test_buckets_respect_area_sides_and_step():
    resolutions = bucket_resolutions(256 * 256, 128, 512, 32)
    assert all(w * h <= 256 * 256 and 128 <= min(w, h) and max(w, h) <= 512 for h, w in resolutions)
    assert all(w % 32 == 0 and h % 32 == 0 for h, w in resolutions)
    assert (256, 256) in resolutions
    with pytest.raises(ValueError, match="multiples of step"):
        bucket_resolutions(256 * 256, 100, 512, 32)


def test_assignment_is_nearest_in_log_aspect_and_prunes_extremes():
    resolutions = [(512, 256), (512, 512), (256, 512)]  # (height, width): tall, square, wide
    widths = np.array([500, 1000, 300, 1000, 4000])
    heights = np.array([500, 600, 590, 2000, 100])
    a = assign_buckets(widths, heights, resolutions, max_ar_error=0.3)
    # 1000x600: |log 1.667 - log 2| = 0.18 < |log 1.667 - 0| = 0.51, so the 2:1 bucket
    assert a.bucket.tolist() == [1, 2, 0, 0, -1]
    np.testing.assert_allclose(a.error[:2], [0.0, np.log(2) - np.log(1000 / 600)])
    assert a.too_extreme.tolist() == [False, False, False, False, True]


def test_log_space_treats_wide_and_tall_alike():
    resolutions = [(512, 256), (512, 512), (256, 512)]
    a = assign_buckets(np.array([2000, 1000]), np.array([1000, 2000]), resolutions, max_ar_error=1.0)
    assert a.bucket.tolist() == [2, 0]
    np.testing.assert_allclose(a.error[0], a.error[1])


def test_no_upscale_only_uses_buckets_inside_the_image():
    resolutions = [(256, 256), (512, 512)]
    widths, heights = np.array([300, 600, 200]), np.array([300, 600, 200])
    assert assign_buckets(widths, heights, resolutions, 0.5).bucket.tolist() == [1, 1, 1]  # larger of equals
    a = assign_buckets(widths, heights, resolutions, 0.5, no_upscale=True)
    assert a.bucket.tolist() == [0, 1, -1]  # the largest bucket that fits
    assert a.too_small.tolist() == [False, False, True]


def _sampler_inputs(n=203, seed=0):
    rng = np.random.default_rng(seed)
    widths, heights = rng.integers(200, 1200, n), rng.integers(200, 1200, n)
    resolutions = bucket_resolutions(512 * 768, 256, 1024, 64, base_side=512)
    return assign_buckets(widths, heights, resolutions, max_ar_error=0.25).bucket, resolutions


@pytest.mark.parametrize("world", [1, 2, 3])
def test_epoch_covers_every_kept_image_once_across_ranks_with_equal_batches(world):
    buckets, resolutions = _sampler_inputs()
    samplers = [BucketBatchSampler(buckets, resolutions, 4, (512, 512), world, rank, seed=5) for rank in range(world)]
    per_rank = [list(s) for s in samplers]
    assert len({len(batches) for batches in per_rank}) == 1 and len(per_rank[0]) == len(samplers[0])
    seen = [i for batches in per_rank for batch in batches for i, *_ in batch]
    kept = np.flatnonzero(buckets >= 0)
    assert len(seen) == len(set(seen))  # nothing twice, ranks disjoint
    assert set(seen) <= set(kept.tolist())
    assert len(kept) - len(seen) < 4 * world  # only the trim to a multiple of batch x world is dropped
    for batches in per_rank:
        for batch in batches:
            assert len(batch) == 4 and len({(h, w) for _, h, w, _ in batch}) == 1
            resolution = (batch[0].height, batch[0].width)
            if resolution != (512, 512):  # bucketed batches: every image belongs to that bucket
                assert all(resolutions[buckets[i]] == resolution for i, *_ in batch)


def test_most_batches_are_true_buckets_not_leftovers():
    buckets, resolutions = _sampler_inputs(n=5000)
    batches = list(BucketBatchSampler(buckets, resolutions, 8, (512, 512), seed=1))
    exact = sum(all(resolutions[buckets[i]] == (h, w) for i, h, w, _ in batch) for batch in batches)
    assert exact / len(batches) > 0.9


def test_epochs_differ_and_repeat_from_seed_and_epoch():
    buckets, resolutions = _sampler_inputs()
    a = BucketBatchSampler(buckets, resolutions, 4, (512, 512), seed=3)
    b = BucketBatchSampler(buckets, resolutions, 4, (512, 512), seed=3)
    first = list(a)
    assert first == list(b)
    a.set_epoch(1)
    assert list(a) != first
    assert list(BucketBatchSampler(buckets, resolutions, 4, (512, 512), seed=4)) != first


def test_restored_sampler_yields_exactly_the_batches_left():
    buckets, resolutions = _sampler_inputs()
    full = BucketBatchSampler(buckets, resolutions, 4, (512, 512), num_replicas=2, rank=1, seed=9)
    full.set_epoch(2)
    expected = list(full)
    partial = BucketBatchSampler(buckets, resolutions, 4, (512, 512), num_replicas=2, rank=1, seed=9)
    partial.set_epoch(2)
    iterator = iter(partial)
    taken = [next(iterator) for _ in range(7)]
    state = partial.state_dict()
    assert state == {"epoch": 2, "start_batch": 7}
    restored = BucketBatchSampler(buckets, resolutions, 4, (512, 512), num_replicas=2, rank=1, seed=9)
    restored.load_state_dict(state)
    rest = list(restored)
    assert taken + rest == expected
    assert list(restored) == expected  # the skip applies to the resumed epoch's first pass only


def test_fast_assignment_equals_brute_force_nearest():
    rng = np.random.default_rng(1)
    widths, heights = rng.integers(50, 5000, 20000), rng.integers(50, 5000, 20000)
    resolutions = bucket_resolutions(512 * 768, 256, 1024, 64, base_side=512)
    aspects = np.log(np.array([w / h for h, w in resolutions]))
    brute = np.abs(np.log(widths / heights)[:, None] - aspects[None, :]).argmin(axis=1)
    a = assign_buckets(widths, heights, resolutions, max_ar_error=10.0)
    np.testing.assert_array_equal(a.bucket, brute)
    np.testing.assert_allclose(a.error, np.abs(np.log(widths / heights) - aspects[brute]))
