"""A small convolutional feature network for sample-quality metrics on data without published feature weights:
FID and precision/recall in its feature space, as a LeNet trained on MNIST serves MNIST FID."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FeatureNet(nn.Module):
    """Stride-2 3x3 convolutions (GroupNorm, SiLU), then a linear map of the whole last feature map to
    ``num_features`` (the embedding, which keeps where things are), and a linear ``head`` that predicts the
    standardized training targets from it. Images are resized to ``resolution`` first."""

    def __init__(self, num_targets: int, resolution: int = 64, num_features: int = 64,
                 block_out_channels: tuple[int, ...] = (32, 64, 128)):
        super().__init__()
        if resolution % 2 ** len(block_out_channels):
            raise ValueError(f"resolution={resolution} must be a multiple of {2 ** len(block_out_channels)}")
        layers, channels = [], 3
        for out_channels in block_out_channels:
            layers += [nn.Conv2d(channels, out_channels, 3, stride=2, padding=1), nn.GroupNorm(8, out_channels),
                       nn.SiLU()]
            channels = out_channels
        side = resolution // 2 ** len(block_out_channels)
        self.trunk = nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels * side * side, num_features))
        self.head = nn.Sequential(nn.SiLU(), nn.Linear(num_features, num_targets))
        # the targets' standardization, saved with the weights: predict() gives standardized targets
        self.register_buffer("target_mean", torch.zeros(num_targets))
        self.register_buffer("target_std", torch.ones(num_targets))
        self.resolution = resolution

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) images in [-1, 1] -> (N, num_features) embeddings."""
        if images.shape[-2:] != (self.resolution, self.resolution):
            images = F.interpolate(images, size=(self.resolution, self.resolution), mode="bilinear", antialias=True)
        return self.trunk(images)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self(images))
