"""CLIP score (Hessel et al. 2021) of text-conditional samples: 100 x the cosine similarity of a pretrained CLIP's
image and text embeddings, averaged (torchmetrics' ``CLIPScore``), for samples against their prompts and for real
images against their captions. The CLIP model loads from a hub id or a local folder; offline its absence is a
note, not a failure."""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics.multimodal import CLIPScore
from transformers import CLIPModel, CLIPProcessor

from ldm_lab.core.weights import MissingWeightsError


def load_clip_score(clip_model: str) -> CLIPScore:
    """torchmetrics' ``CLIPScore`` with CLIP ``clip_model`` (``evaluate.clip_model``: a hub id or a local folder
    holding the model and its processor)."""
    try:
        model, processor = CLIPModel.from_pretrained(clip_model), CLIPProcessor.from_pretrained(clip_model)
    except OSError as error:
        raise MissingWeightsError(
            f"no CLIP score: could not load the CLIP model {clip_model!r} ({type(error).__name__}: "
            f"{str(error).splitlines()[0]}). Without network access, download it where you have one "
            f"(huggingface-cli download {clip_model} --local-dir /path/to/copy) and set "
            f"evaluate.clip_model=/path/to/copy; evaluate.clip_model=null turns it off") from error
    return CLIPScore(model_name_or_path=lambda: (ProjectedFeatures(model.eval()), processor))


class ProjectedFeatures(nn.Module):
    """A ``CLIPModel`` whose ``get_image_features`` and ``get_text_features`` return the projected embeddings as
    tensors, as torchmetrics 1.9's ``CLIPScore`` reads them; transformers 5 returns them in an output object's
    ``pooler_output`` (torchmetrics issue 3407, fixed after 1.9)."""

    def __init__(self, model: CLIPModel):
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return _tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return _tensor(self.model.get_text_features(*args, **kwargs))


def _tensor(features) -> torch.Tensor:
    return features if isinstance(features, torch.Tensor) else features.pooler_output


def as_clip_images(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] as the 0-255 values CLIP's processor rescales."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
