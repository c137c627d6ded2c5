"""Prompt adherence on the captioned synthetic data: prompts parsed into facts, a reader that reads them back, and
task=evaluate's figures for a text model beside their chance level and ceiling."""

from __future__ import annotations

import json

import pytest
import torch

from ldm_lab.data.synthetic_captions import COLOURS, KINDS, describe
from ldm_lab.evaluation.prompt_adherence import (
    CHOICES,
    adheres,
    fact_matches,
    facts_of,
    read_back,
    render,
    train_reader,
)
from ldm_lab.tasks import evaluate, sample_metrics, train
from tests.conftest import LDM_TINY
from tests.helpers import save_tiny_clip, save_tiny_first_stage


@pytest.mark.parametrize("kind, count, colour, background", [(0, 1, "red", "blue"), (2, 3, "white", "black"),
                                                             (1, 2, "yellow", "green")])
def test_every_phrasing_states_the_same_facts(kind, count, colour, background):
    expected = torch.tensor([kind, count - 1, list(COLOURS).index(colour), list(COLOURS).index(background)])
    for caption in describe(kind, count, colour, background):
        assert torch.equal(facts_of(caption), expected), caption
    assert facts_of("a photo of a cat") is None
    assert facts_of(f"two {colour} hexagons on a {background} background") is None  # no such kind


def test_a_sample_adheres_only_when_all_four_facts_are_read_back():
    class Reader:  # reads every picture as "two red circles on a blue background"
        def predict(self, images):
            logits = torch.full((len(images), sum(len(v) for v in CHOICES.values()) + 1), -9.0)
            offsets = [0, 3, 6, 12]
            for head, value in enumerate([0, 1, 0, 2]):
                logits[:, offsets[head] + value] = 9.0
            return logits

    images = torch.zeros(3, 3, 8, 8)
    prompts = ["two red circles on a blue background", "2 red circles, blue background", "two red squares on a blue "
               "background"]
    assert adheres(Reader(), images, prompts).tolist() == [True, True, False]
    assert fact_matches(Reader(), images, prompts)[2].tolist() == [False, True, True, True]  # only the kind is wrong
    assert KINDS[read_back(Reader(), images)[0, 0]] == "circle"


def test_the_reader_reads_unseen_renders():
    reader, accuracy = train_reader(32, steps=300, num_renders=1024)
    images, facts = render(128, 32, seed=7)
    per_fact = (read_back(reader, images) == facts).float().mean(dim=0)
    # 300 steps read kind, count, colour, background right 52%, 81%, 98%, 100% of the time, all four 44% (chance:
    # 1/3, 1/3, 1/6, 1/5 and 0.4%); the cached reader's 1600 steps read 98% whole
    assert accuracy > 0.25 and bool((per_fact > torch.tensor([0.4, 0.6, 0.9, 0.9])).all())


def test_evaluate_reports_adherence_beside_chance_and_real_images(compose_cfg, tmp_path, monkeypatch, offline_hub):
    first_stage = save_tiny_first_stage("kl", tmp_path / "kl")
    common = ["model=unet_text_tiny", *[o for o in LDM_TINY if not o.startswith(("model=", "data.source.num_images"))],
              "data.source.captions=true", "data.source.num_images=24", f"model.first_stage={first_stage}"]
    train.run(compose_cfg([*common, "max_steps=2", "val_every_n_steps=2", "sample.num_images=1"], tiny=False))
    quick = train_reader(32, steps=300, num_renders=1024)[0]
    monkeypatch.setattr(sample_metrics, "load_reader", lambda *args: (quick, "a quick reader"))
    clip = save_tiny_clip(tmp_path / "clip", ["a red circle", "two blue squares"])
    evaluation = [*common, "task=evaluate", f"evaluate.model={tmp_path / 'run' / 'checkpoints'}/last.ckpt",
                  "evaluate.num_samples=8", "sample.batch_size=4", "evaluate.guidance_scales=[1,3]"]
    results = evaluate.run(compose_cfg([*evaluation, f"paths.output_dir={tmp_path / 'eval'}",
                                        f"evaluate.clip_model={clip}"], tiny=False))
    for at in (" @ guidance 1", " @ guidance 3"):
        assert 0 <= results[f"prompt_adherence{at}"] <= 1 and 0 <= results[f"prompt_adherence_shuffled{at}"] <= 1
        assert results[f"fid{at}"] > 0 and -100 <= results[f"clip_score{at}"] <= 100
        assert all(0 <= results[f"prompt_adherence_{fact}{at}"] <= 1 for fact in CHOICES)
    assert results["clip_score @ guidance 1"] != results["clip_score @ guidance 3"]  # reset between the scales
    assert results["prompt_adherence_real"] > results["prompt_adherence @ guidance 3"]  # two steps of training
    # without the CLIP model (offline, not copied here) everything else is still measured, and the note says why
    offline = evaluate.run(compose_cfg([*evaluation, f"paths.output_dir={tmp_path / 'offline'}"], tiny=False))
    assert "clip_score @ guidance 3" not in offline and offline["fid @ guidance 3"] == results["fid @ guidance 3"]
    notes = json.loads((tmp_path / "offline" / "evaluation.json").read_text())["notes"]
    assert any("no CLIP score" in note and "evaluate.clip_model=/path/to/copy" in note for note in notes)
