"""Class-conditional latent diffusion with classifier-free guidance, through the whole chain: labels from the data,
the class embedding, guidance, samples per class, evaluation, and an export diffusers alone samples."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from ldm_lab.core.errors import ConfigError
from ldm_lab.data.buckets import Item
from ldm_lab.data.datamodule import BucketedImages, ImageDataModule
from ldm_lab.data.sources import FolderSource, HFSource
from ldm_lab.data.synthetic import SyntheticSource, class_names
from ldm_lab.diffusion.pipeline import class_ids, guided
from ldm_lab.diffusion.sampling import SamplingOptions, generate, requested_classes
from ldm_lab.evaluation.classes import correct, load_classifier, spread_labels
from ldm_lab.io.checkpoints import read_checkpoint
from ldm_lab.io.model_sources import load_latent_diffusion
from ldm_lab.io.networks import latent_diffusion_of
from ldm_lab.io.samples import grid_classes
from ldm_lab.stages.build import build_stage
from ldm_lab.tasks import evaluate, model_config, sample, train
from ldm_lab.tasks.trainer import build_datamodule
from tests.conftest import LDM_TINY
from tests.helpers import save_tiny_first_stage


def _image(path, size=(40, 36), colour=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _class_folder(root):
    """Classes "10", "2" and "b" (sorted as strings: 10, 2, b), 3 images each, and one loose image at the root."""
    for name in ("b", "2", "10"):
        for i in range(3):
            _image(root / name / f"{i}.png", colour=(40 * i, 90, len(name) * 60))
    _image(root / "loose.png")
    return root


def test_subfolders_are_the_classes_sorted_as_strings_and_a_loose_image_is_skipped_by_name(tmp_path, caplog):
    root = _class_folder(tmp_path / "images")
    with caplog.at_level(logging.WARNING):
        index = FolderSource(root, labels="subfolder").index(None)
    assert index.class_names == ["10", "2", "b"]
    assert [(p.split("/")[-2], int(label)) for p, label in zip(index.locations, index.labels, strict=True)] == \
        [("10", 0)] * 3 + [("2", 1)] * 3 + [("b", 2)] * 3
    assert sum(count for reason, count in index.skipped.items() if "no class" in reason) == 1
    assert "loose.png" in caplog.text
    assert FolderSource(root).index(None).labels is None  # unlabelled: every image, no classes
    with pytest.raises(ConfigError, match="data.source.labels=folders"):
        FolderSource(root, labels="folders")


def test_labels_travel_with_batches_and_a_replaced_image_brings_its_own(tmp_path, monkeypatch):
    root = _class_folder(tmp_path / "images")
    datamodule = ImageDataModule(FolderSource(root, labels="subfolder"), resolution=16, batch_size=3, num_val=2,
                                 num_workers=0, random_crop=False, random_flip=False)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["class_labels"].tolist() == datamodule.index.labels[batch["index"]].tolist()
    # image 2 (the last of class "10") cannot be decoded: image 3 (class "2") is served in its place, with its label
    broken = datamodule.index.locations[2]
    real_open = FolderSource.open
    monkeypatch.setattr(FolderSource, "open", lambda self, where: (_ for _ in ()).throw(OSError("broken"))
                        if where == broken else real_open(self, where))
    images = BucketedImages(datamodule.source, datamodule.index, False, False)
    served = images[Item(2, 16, 16)]
    assert served["index"] == 2 and served["class_labels"] == 1 == int(datamodule.index.labels[3])


def test_max_images_keeps_every_class(tmp_path):
    root = _class_folder(tmp_path / "images")
    datamodule = ImageDataModule(FolderSource(root, labels="subfolder"), resolution=16, batch_size=1, num_val=1,
                                 max_images=5, num_workers=0)
    datamodule.setup_index()
    assert sorted(np.bincount(datamodule.index.labels).tolist()) == [1, 2, 2]  # the first 5 paths: 3 + 2 of 2 classes


def _labelled_dataset(names, labels, colours):
    rows = []
    for colour in colours:
        image = Image.new("RGB", (40, 36), colour)
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        rows.append({"bytes": buffer.getvalue(), "path": None})
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    return datasets.Dataset.from_dict({"image": rows, "label": labels}, features=features)


def test_hugging_face_label_column_and_a_validation_split_matched_by_class_name(tmp_path, caplog):
    _labelled_dataset(["cat", "dog"], [0, 1, 1, 0, 1, 0], [(i * 30, 0, 0) for i in range(6)]).save_to_disk(
        str(tmp_path / "train"))
    # the validation split numbers its classes otherwise and has one the training split lacks
    _labelled_dataset(["bird", "dog", "cat"], [0, 1, 2, 2], [(0, i * 30, 0) for i in range(4)]).save_to_disk(
        str(tmp_path / "val"))
    datamodule = ImageDataModule(HFSource(str(tmp_path / "train"), label_column="label"),
                                 HFSource(str(tmp_path / "val"), label_column="label"), resolution=16, batch_size=2,
                                 num_val=10, num_workers=0)
    with caplog.at_level(logging.WARNING):
        datamodule.setup("fit")
    assert datamodule.class_names == ["cat", "dog"]
    assert datamodule.index.labels.tolist() == [0, 1, 1, 0, 1, 0] + [1, 0, 0]  # val: dog, cat, cat
    assert "bird" in caplog.text
    with pytest.raises(ConfigError, match="no column 'class'"):
        HFSource(str(tmp_path / "train"), label_column="class").prepare()


def test_the_synthetic_set_with_classes_names_them_in_its_folder_and_draws_them_in_turn(tmp_path):
    source = SyntheticSource(tmp_path, num_images=8, min_side=32, max_side=40, num_classes=4)
    assert source.root.name.endswith("-k4") and source.labels == "subfolder"
    source.prepare()
    index = source.index(None)
    assert index.class_names == class_names(4) == sorted(class_names(4))
    assert sorted((int(p.split("/")[-1][:6]) % 4, int(label)) for p, label in zip(index.locations, index.labels,
                                                                                    strict=True)) == \
        sorted((i % 4, i % 4) for i in range(8))
    assert SyntheticSource(tmp_path, num_images=8, min_side=32, max_side=40).root.name == "seed0-n8-side32-40"


def test_guidance_in_one_doubled_batch_equals_two_separate_passes():
    torch.manual_seed(0)
    from diffusers import UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, num_class_embeds=3 + 1).eval()
    latents, t, labels = torch.randn(2, 4, 8, 8), torch.tensor(500), torch.tensor([0, 2])
    with torch.no_grad():
        conditional = unet(latents, t, class_labels=labels).sample
        unconditional = unet(latents, t, class_labels=torch.tensor([3, 3])).sample
        condition, null = {"class_labels": labels}, {"class_labels": torch.tensor([3, 3])}
        torch.testing.assert_close(guided(unet, condition, null, 4.0)(latents, t),
                                   unconditional + 4.0 * (conditional - unconditional), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(guided(unet, condition, null, 1.0)(latents, t), conditional)
        assert not torch.allclose(conditional, unconditional, atol=1e-4)  # the class changes the prediction


def test_class_labels_by_name_id_or_null_class_and_grid_rows_evenly_spaced():
    names = ["cat", "dog", "10"]
    assert requested_classes(SamplingOptions(class_labels=None), names) == [0, 1, 2]
    assert class_ids(["dog", 0, "10", "null_class"], names) == [1, 0, 2, 3]
    assert class_ids("null_class", names) == [3] == class_ids(3, names)  # id K: the null class
    with pytest.raises(ConfigError, match="sample.class_labels: 'cow' is no class"):
        requested_classes(SamplingOptions(class_labels=("cow",)), names)
    assert grid_classes(list(range(100))) == [round(i * 99 / 15) for i in range(16)]
    assert grid_classes([4, 7]) == [4, 7]
    assert spread_labels(7, 3).tolist() == [0, 1, 2, 0, 1, 2, 0]


def _cfg(compose_cfg, first_stage, *overrides):
    return compose_cfg([*LDM_TINY, f"model.first_stage={first_stage}", "model.conditioning=class",
                        "data.source.num_classes=4", "data.source.num_images=16", *overrides], tiny=False)


@pytest.fixture
def first_stage(tmp_path):
    return save_tiny_first_stage("kl", tmp_path / "first_stage")


def test_the_stage_learns_the_datas_classes_and_drops_labels_for_guidance(compose_cfg, first_stage, tmp_path):
    cfg = _cfg(compose_cfg, first_stage)
    datamodule = build_datamodule(cfg)
    model = model_config.with_data(cfg.model, datamodule)
    stage = build_stage(model, cfg.disc)
    assert stage.class_names == class_names(4) and stage.denoiser.config.num_class_embeds == 5
    labels = torch.arange(4).repeat(2500)
    dropped = stage.condition({"class_labels": labels}, torch.Generator().manual_seed(0), None)["class_labels"]
    share = float((dropped == 4).float().mean())
    assert 0.09 < share < 0.11 and torch.equal(dropped[dropped != 4], labels[dropped != 4])
    with pytest.raises(ConfigError, match="has none: label it"):  # unlabelled data
        unlabelled = compose_cfg([*LDM_TINY, f"model.first_stage={first_stage}", "model.conditioning=class"],
                                 tiny=False)
        model_config.with_data(unlabelled.model, build_datamodule(unlabelled))
    with pytest.raises(Exception, match="model.conditioning=classes: null"):  # wrapped by Hydra's instantiate
        build_stage(compose_cfg([*LDM_TINY, f"model.first_stage={first_stage}", "model.conditioning=classes",
                                 "model.class_names=[a,b]"], tiny=False).model, None)


@pytest.fixture
def trained(compose_cfg, first_stage, tmp_path):
    """A class-conditional tiny LDM trained 2 steps by task=train: its run folder."""
    train.run(_cfg(compose_cfg, first_stage, "max_steps=2", "val_every_n_steps=2", "sample.num_images=2",
                   "sample.num_inference_steps=2", "callbacks.image_logger.num_images=8",
                   f"paths.output_dir={tmp_path / 'train'}"))
    return tmp_path / "train"


def test_train_sample_and_resume_with_classes(compose_cfg, first_stage, trained, tmp_path):
    checkpoint = trained / "checkpoints" / "last.ckpt"
    networks = latent_diffusion_of(read_checkpoint(checkpoint))  # from the checkpoint alone: the classes are in it
    assert networks.class_names == class_names(4) and networks.denoiser.config.num_class_embeds == 5
    with Image.open(trained / "images" / "samples_step0000002.png") as preview:  # 4 rows (classes) of 2
        assert preview.size == (2 * 34 + 2, 4 * 34 + 2)
    sample.run(_cfg(compose_cfg, first_stage, "task=sample", f"ckpt_path={checkpoint}", "sample.num_images=3",
                    "sample.class_labels=[03-lines-hue315,0,null_class]", "sample.num_inference_steps=2",
                    "sample.height=32", "sample.width=32",
                    f"paths.output_dir={tmp_path / 'sample'}"))
    out = tmp_path / "sample" / "samples"
    assert sorted(p.name for p in out.iterdir()) == ["00-ellipses-hue045", "03-lines-hue315", "grid.png", "null_class"]
    assert all(len(list((out / name).glob("sample_*.png"))) == 3 for name in ("00-ellipses-hue045", "null_class"))
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (3 * 34 + 2, 3 * 34 + 2)  # a row per class asked for
    # resuming on data of other classes is refused, naming both lists
    with pytest.raises(ConfigError, match=r"trained on the classes 4 \[00-ellipses.*has 3 \[00-ellipses-hue060"):
        train.run(_cfg(compose_cfg, first_stage, "data.source.num_classes=3", f"ckpt_path={checkpoint}",
                       f"paths.output_dir={trained}"))


def test_the_export_samples_a_class_through_diffusers_alone(compose_cfg, first_stage, trained, tmp_path):
    export = trained / "export"
    assert (export / "pipeline.py").is_file()
    code = f"""
import sys, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained({str(export)!r}, trust_remote_code=True)  # model_index names pipeline.py
images = pipe(class_labels=["02-polygons-hue225", 3], guidance_scale=2.5, num_inference_steps=3, height=32, width=32,
              generator=torch.Generator().manual_seed(7), output_type="pt").images
torch.save(images, {str(tmp_path / "theirs.pt")!r})
print(type(pipe).__name__, "ldm_lab" in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={"HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-2:] == ["LatentDiffusionPipeline", "False"]
    ours = generate(load_latent_diffusion(export, "sample.model"), SamplingOptions(num_inference_steps=3), 2, 32, 32,
                    torch.Generator().manual_seed(7), class_labels=[2, 3], guidance_scale=2.5)
    theirs = torch.load(tmp_path / "theirs.pt")
    torch.testing.assert_close(theirs, ((ours + 1) / 2).clamp(0, 1), rtol=0, atol=1e-5)
    index = json.loads((export / "model_index.json").read_text())
    assert index["class_names"] == class_names(4) and index["objective"] == "ddpm"
    assert index["_class_name"] == ["pipeline", "LatentDiffusionPipeline"]


def test_evaluate_spreads_samples_over_the_classes_at_guidance_1_and_the_chosen_scale(compose_cfg, first_stage,
                                                                                       trained, tmp_path, monkeypatch):
    from ldm_lab.evaluation import metrics

    monkeypatch.setattr(metrics.SampleQuality, "min_class_samples", 4)  # per class with few samples (k = 3 needs 4)
    results = evaluate.run(_cfg(compose_cfg, first_stage, "task=evaluate", f"evaluate.model={trained / 'export'}",
                                "data.source.num_images=48", "evaluate.num_samples=16", "sample.batch_size=8",
                                "sample.num_inference_steps=2",
                                "sample.guidance_scale=3", f"paths.output_dir={tmp_path / 'eval'}"))
    for scale in ("1", "3"):
        assert 0 <= results[f"class_accuracy @ guidance {scale}"] <= 1 and results[f"fid @ guidance {scale}"] > 0
        assert results[f"floor_fid @ guidance {scale}"] > 0
        assert sum(key.startswith("fid of ") and key.endswith(f"guidance {scale}") for key in results) == 4
    assert results["fid @ guidance 1"] != results["fid @ guidance 3"]
    assert "class_accuracy @ guidance 3" in (tmp_path / "eval" / "evaluation.md").read_text()


def test_a_classifier_file_tells_the_class_of_images(tmp_path):
    class Red(torch.nn.Module):  # class 0 if red dominates, else 1
        def forward(self, x):
            return torch.stack([x[:, 0].mean((1, 2)), x[:, 1:].mean((1, 2, 3))], dim=1)

    torch.jit.save(torch.jit.script(Red()), tmp_path / "red.pt")  # TorchScript
    classify = load_classifier(tmp_path / "red.pt")
    images = torch.stack([torch.tensor([1.0, -1, -1]), torch.tensor([-1.0, 1, 1])])[:, :, None, None].expand(2, 3, 8, 8)
    assert correct(classify, images, torch.tensor([0, 1]), 2).tolist() == [True, True]
    assert correct(classify, images, torch.tensor([1, 1]), 2).tolist() == [False, True]
    with pytest.raises(ConfigError, match="scores 2 classes, the model draws 3"):
        correct(classify, images, torch.tensor([0, 1]), 3)
    pickled = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 2))
    torch.save(pickled, tmp_path / "whole.pt")  # a module saved whole (torchvision's models are)
    assert correct(load_classifier(tmp_path / "whole.pt"), images, torch.tensor([0, 1]), 2).shape == (2,)
    torch.save(pickled.state_dict(), tmp_path / "state.pt")
    with pytest.raises(ConfigError, match="not a model saved whole"):
        load_classifier(tmp_path / "state.pt")


def test_the_latent_cache_keeps_the_label_of_the_image_it_encoded(compose_cfg, first_stage, tmp_path, monkeypatch):
    from ldm_lab.stages.encoding import encode_latent_cache

    root = _class_folder(tmp_path / "images")
    cfg = compose_cfg([*[o for o in LDM_TINY if not o.startswith("data.source.")], f"model.first_stage={first_stage}",
                       "data=folder", f"data.source.root={root}", "data.source.labels=subfolder", "data.num_val=2",
                       "data.num_workers=0"], tiny=False)
    datamodule = build_datamodule(cfg)
    datamodule.setup_index()
    broken = datamodule.index.locations[2]  # the last image of class "10": encoded as image 3, of class "2"
    real_open = FolderSource.open
    monkeypatch.setattr(FolderSource, "open", lambda self, where: (_ for _ in ()).throw(OSError("broken"))
                        if where == broken else real_open(self, where))
    manifest = encode_latent_cache(build_stage(cfg.model, cfg.disc).first_stage, datamodule, cfg.paths.latent_cache)
    expected = datamodule.index.labels.tolist()
    expected[2] = expected[3]
    assert manifest["labels"] == expected and expected != datamodule.index.labels.tolist()
    datamodule.setup("fit")
    batch = next(iter(datamodule.val_dataloader()))
    assert "latents" in batch and batch["class_labels"].tolist() == [expected[i] for i in batch["index"].tolist()]
