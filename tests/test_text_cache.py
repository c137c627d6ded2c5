"""The text cache: a frozen text encoder's caption embeddings encoded once, beside the latents, keyed by the encoder
and the caption's text, with caption dropout still drawn per step."""

from __future__ import annotations

import logging
import shutil
import threading

import pytest
import torch

from ldm_lab.core.errors import ConfigError
from ldm_lab.core.fingerprint import text_key
from ldm_lab.data.latent_cache import text_condition
from ldm_lab.diffusion.pipeline import encode_prompt
from ldm_lab.stages import conditioning, encoding
from ldm_lab.stages import latent_diffusion as stage_module
from ldm_lab.stages.encoding import encode_latent_cache, encode_text_cache
from ldm_lab.tasks import train
from ldm_lab.tasks.trainer import build_datamodule
from tests.conftest import COLOURS
from tests.helpers import save_tiny_text_encoder, text_stage


@pytest.fixture
def frozen_cfg(text_cfg, tmp_path):
    """The text config with a tiny frozen CLIP-architecture encoder, loaded as model/text_encoder=clip_l loads one."""
    captions = [f"a {colour} square" for colour in COLOURS]
    encoder = save_tiny_text_encoder("clip", tmp_path / "clip", captions)

    def make(*overrides):
        return text_cfg("model/text_encoder=clip_l", f"model.text_encoder.pretrained_model_name_or_path={encoder}",
                        *overrides)
    return make


def _encode(cfg, tmp_path, monkeypatch):
    """The stage, its datamodule with both caches filled, and the captions the text encoder read."""
    stage = text_stage(cfg, tmp_path)
    datamodule = _datamodule(cfg)
    encode_latent_cache(stage.first_stage, datamodule, tmp_path / "cache")
    read = []
    monkeypatch.setattr(encoding, "encode_prompt",
                        lambda tokenizer, encoder, prompts: read.extend(prompts) or encode_prompt(tokenizer, encoder,
                                                                                                  prompts))
    cache = encode_text_cache(stage.tokenizer, stage.text_encoder, datamodule, tmp_path / "cache")
    return stage, datamodule, cache, read


def _datamodule(cfg):
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    datamodule.setup_index()
    return datamodule


def test_each_caption_is_encoded_once_and_a_changed_caption_again(frozen_cfg, tmp_path, monkeypatch, caplog):
    (tmp_path / "images" / "red0.txt").write_text("a red square\na square of red\n")  # two captions, both cached
    with caplog.at_level(logging.INFO, logger=encoding.__name__):
        stage, datamodule, cache, read = _encode(frozen_cfg(), tmp_path, monkeypatch)
    expected = {"", "a square of red", *(f"a {colour} square" for colour in COLOURS)}
    assert sorted(read) == sorted(expected)
    for caption in expected:  # each entry is what the pipeline's encode_prompt makes of that caption
        torch.testing.assert_close(text_condition(cache.shards, caption)["encoder_hidden_states"],
                                   encode_prompt(stage.tokenizer, stage.text_encoder, [caption])["encoder_hidden_states"][0],
                                   rtol=0, atol=1e-6)
    assert "KB per caption" in caplog.text and "KB per image" in caplog.text
    _, _, _, read = _encode(frozen_cfg(), tmp_path, monkeypatch)
    assert read == []  # the next run reads them all from the cache
    (tmp_path / "images" / "blue1.txt").write_text("a blue square, slightly moved\n")
    _, datamodule, cache, read = _encode(frozen_cfg(), tmp_path, monkeypatch)
    assert read == ["a blue square, slightly moved"]  # the changed caption, and nothing else, is encoded again
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["encoder_hidden_states"].shape == (len(batch["captions"]), 16, 32)


def test_another_encoder_gets_its_own_cache(frozen_cfg, tmp_path, monkeypatch):
    _, _, first, _ = _encode(frozen_cfg(), tmp_path, monkeypatch)
    other = save_tiny_text_encoder("clip", tmp_path / "clip2", ["a red square"], seed=1)
    _, _, second, read = _encode(frozen_cfg(f"model.text_encoder.pretrained_model_name_or_path={other}"), tmp_path,
                                 monkeypatch)
    assert second.dir != first.dir and len(read) == 1 + len(COLOURS)


def test_caption_dropout_is_drawn_per_step_from_the_cached_embeddings(frozen_cfg, tmp_path, monkeypatch):
    conditions = []
    condition = stage_module.LatentDiffusionStage.condition

    def recorded(self, batch, generator, text_encoder):
        result = condition(self, batch, generator, text_encoder)
        if generator is not None:
            conditions.append((list(batch["captions"]), result["encoder_hidden_states"].clone()))
        return result

    monkeypatch.setattr(stage_module.LatentDiffusionStage, "condition", recorded)
    monkeypatch.setattr(conditioning, "encode_prompt", lambda *args: pytest.fail("a cached caption was encoded"))
    train.run(frozen_cfg("max_steps=4", "val_every_n_steps=4", "model.caption_dropout=0.5", "sample.num_images=0"))
    assert not (tmp_path / "run" / "samples").exists()  # none asked for
    stage = text_stage(frozen_cfg(), tmp_path)
    empty = encode_prompt(stage.tokenizer, stage.text_encoder, [""])["encoder_hidden_states"][0]
    masks = []
    for captions, states in conditions:
        own = encode_prompt(stage.tokenizer, stage.text_encoder, captions)["encoder_hidden_states"]
        dropped = [torch.allclose(row, empty, atol=1e-6) for row in states]
        kept = [torch.allclose(row, mine, atol=1e-6) for row, mine in zip(states, own, strict=True)]
        assert all(d != k for d, k in zip(dropped, kept, strict=True))  # each row: its caption's or the empty one
        masks.append(dropped)
    assert len(masks) == 4 and len({tuple(m) for m in masks}) > 1 and 0 < sum(map(sum, masks)) < sum(map(len, masks))


def test_shuffled_captions_are_refused_with_the_text_cache(frozen_cfg, tmp_path):
    cfg = frozen_cfg("data.shuffle_caption=true")
    stage = text_stage(cfg, tmp_path)
    with pytest.raises(ConfigError, match="model.text_cache=false"):
        stage.attach_data(_datamodule(cfg), tmp_path / "cache")
    stage = text_stage(frozen_cfg("data.shuffle_caption=true", "model.text_cache=false"), tmp_path)
    stage.attach_data(_datamodule(cfg), tmp_path / "cache")  # the encoder then reads each step's shuffled text


def test_a_text_cache_larger_than_the_free_disk_is_refused(frozen_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(ConfigError, match=r"text cache needs .* GB .* 0\.00 GB free: set paths\.latent_cache"):
        _encode(frozen_cfg(), tmp_path, monkeypatch)


def test_ranks_encode_disjoint_shares_into_one_cache(frozen_cfg, tmp_path, monkeypatch):
    """Two ranks (threads standing in for processes, as DDP's meet at barriers) each encode every other batch of
    the captions; each then reads every caption from the one cache."""
    cfg = frozen_cfg()
    stage = text_stage(cfg, tmp_path)
    barrier = threading.Barrier(2)
    read, caches = {0: [], 1: []}, {}

    def encode(rank):
        ranks = encoding.Ranks(rank, 2, lambda part: [part], barrier.wait)
        datamodule = _datamodule(cfg)
        caches[rank] = encode_text_cache(stage.tokenizer, stage.text_encoder, datamodule, tmp_path / "cache",
                                         ranks=ranks, batch_size=2)

    monkeypatch.setattr(encoding, "encode_prompt", lambda tokenizer, encoder, prompts: read[
        int(threading.current_thread().name[-1])].extend(prompts) or encode_prompt(tokenizer, encoder, prompts))
    threads = [threading.Thread(target=encode, args=(rank,), name=f"rank{rank}") for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    expected = {"", *(f"a {colour} square" for colour in COLOURS)}
    assert read[0] and read[1] and not set(read[0]) & set(read[1]) and set(read[0]) | set(read[1]) == expected
    for cache in caches.values():
        assert all(text_key(caption) in cache for caption in expected)
