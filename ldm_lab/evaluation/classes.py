"""Measuring a class-conditional model's samples: which classes they are drawn for (evenly spread) and whether a
classifier tells them as their class: on the embedded synthetic data the lab's feature network
(ldm_lab/evaluation/synthetic_features.py), elsewhere a classifier the user gives (``evaluate.classifier``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ldm_lab.core.errors import ConfigError, MissingPathError

Classify = Callable[[torch.Tensor], torch.Tensor]  # images in [-1, 1] -> (N, K) class scores
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def spread_labels(num_samples: int, num_classes: int) -> torch.Tensor:
    """Sample i is of class i mod K: the classes evenly, the first ones once more when K does not divide."""
    return torch.arange(num_samples) % num_classes


def load_classifier(path: str | Path) -> Classify:
    """A torchvision-style classifier saved whole (``torch.save(model)`` or ``torch.jit.save``) whose logits
    are over the data's classes in their id order; it gets the samples in [0, 1] normalized with ImageNet's
    mean and std, at the samples' resolution (torchvision's CNNs pool to any size)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingPathError(f"evaluate.classifier={path} does not exist: give a classifier saved whole with "
                               f"torch.save(model, path) or torch.jit.save, or evaluate.classifier=null")
    try:
        model = torch.jit.load(str(path), map_location="cpu")
    except RuntimeError:  # not TorchScript: a pickled module
        model = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(model, nn.Module | torch.jit.ScriptModule):
        raise ConfigError(f"evaluate.classifier={path} holds a {type(model).__name__}, not a model saved whole: save "
                          f"it with torch.save(model, path) (a state dict has no architecture)")
    model.eval().to("cuda" if torch.cuda.is_available() else "cpu")
    device = next(model.parameters(), torch.empty(0)).device
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    @torch.no_grad()
    def classify(images: torch.Tensor) -> torch.Tensor:
        normalized = ((images.float().cpu().clamp(-1, 1) + 1) / 2 - mean) / std
        return model(normalized.to(device)).float().cpu()

    return classify


def correct(classify: Classify, images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Whether each image is told as its class; a classifier of another number of classes is refused."""
    with torch.no_grad():
        scores = classify(images)
    if scores.shape[1] != num_classes:
        raise ConfigError(f"the classifier scores {scores.shape[1]} classes, the model draws {num_classes}: give one "
                          f"trained on the same classes, in the same order")
    return scores.argmax(dim=1).cpu() == labels.cpu()
