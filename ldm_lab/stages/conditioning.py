"""What a latent diffusion model is conditioned on (``model.conditioning``): nothing, a class (its label, dropped to
the null class with probability ``label_dropout`` in training: classifier-free guidance, Ho & Salimans 2022) or a
caption (encoded by the text encoder as the exported pipeline encodes prompts, or read from the text cache; dropped
to the empty prompt with probability ``caption_dropout``)."""

from __future__ import annotations

import functools

import torch
from torch import nn

from ldm_lab.core.errors import ConfigError
from ldm_lab.diffusion.pipeline import encode_prompt
from ldm_lab.nn.text_encoders import TextEncoder

CONDITIONINGS = (None, "class", "text")  # model.conditioning


class Conditioned:
    """The latent diffusion stage's conditioning of a batch; it reads the stage's ``conditioning``, ``class_names``,
    ``label_dropout``, ``tokenizer``, ``text_encoder`` (``text_encoder_trainable``), ``caption_dropout`` and the
    text cache's ``_empty_prompt``."""

    def condition(self, batch: dict, generator: torch.Generator | None, text_encoder: nn.Module | None) -> dict:
        """What the denoiser is given for a batch: a class-conditional model's labels, a text-conditional model's
        captions encoded by ``text_encoder`` as the exported pipeline encodes prompts (with gradients when it
        trains), or their embeddings from the text cache; with a ``generator`` (training) labels and captions are
        dropped to the null class and the empty prompt, each with its probability, at every step."""
        if self.conditioning == "class":
            labels = self.class_labels(batch)
            return {"class_labels": labels if generator is None else self._dropped_labels(labels, generator)}
        if self.conditioning != "text":
            return {}
        if "captions" not in batch:
            raise ConfigError("a text-conditional model got a batch without captions: train it on captioned data "
                              "(data.source.caption_extension=.txt, data.source.caption_column=..., or "
                              "data.source.captions=true for the synthetic set)")
        dropped = None
        if generator is not None and self.caption_dropout:
            dropped = torch.rand(len(batch["captions"]), generator=generator, device=generator.device) < self.caption_dropout
        if "encoder_hidden_states" in batch:  # the text cache's: the empty prompt's cached condition where dropped
            condition = {key: batch[key] for key in ("encoder_hidden_states", "encoder_attention_mask") if key in batch}
            if dropped is not None:
                condition = {key: torch.where(dropped.to(value.device).view(-1, *[1] * (value.dim() - 1)),
                                              self._empty_prompt[key].to(value.device), value)
                             for key, value in condition.items()}
        else:
            captions = list(batch["captions"])
            if dropped is not None:
                captions = ["" if drop else caption for caption, drop in zip(captions, dropped.tolist(), strict=True)]
            with torch.set_grad_enabled(torch.is_grad_enabled() and text_encoder is self.text_encoder
                                        and self.text_encoder_trainable):
                condition = encode_prompt(self.tokenizer, text_encoder, captions)
        # a bf16 encoder's embeddings meet the denoiser's weights (autocast, where on, casts them again)
        condition["encoder_hidden_states"] = condition["encoder_hidden_states"].to(self.denoiser.dtype)
        return condition

    def class_labels(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """A class-conditional model's labels of a batch (None for an unconditional model)."""
        if self.class_names is None:
            return None
        if "class_labels" not in batch:
            raise ConfigError("a class-conditional model got a batch without class labels: train it on the labelled "
                              "data it was built for")
        return batch["class_labels"]

    def _dropped_labels(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``labels``, each replaced by the null class with probability ``label_dropout``."""
        if not self.label_dropout:
            return labels
        dropped = torch.rand(labels.shape, generator=generator, device=labels.device) < self.label_dropout
        return torch.where(dropped, len(self.class_names), labels)


def class_names_of(conditioning: str | None, class_names: list[str] | None) -> list[str] | None:
    if conditioning not in CONDITIONINGS:
        raise ConfigError(f"model.conditioning={conditioning}: null (unconditional), class or text")
    if conditioning != "class":
        return None
    if not class_names:
        raise ConfigError("model.conditioning=class needs the classes, which training fills in from the data "
                          "(model.class_names): train on labelled data, or build the stage with class_names")
    return [str(name) for name in class_names]


def text_encoder_of(conditioning: str | None, text_encoder: functools.partial | None) -> TextEncoder | None:
    if conditioning != "text":
        return None
    if text_encoder is None:
        raise ConfigError("model.conditioning=text reads captions with a text encoder: model/text_encoder=scratch "
                          "(trained with the denoiser), clip_l or t5_base (pretrained, frozen)")
    return text_encoder()


def describe_classes(class_names: list[str] | None) -> str:
    if class_names is None:
        return "none (unconditional)"
    return f"{len(class_names)} [{', '.join(class_names[:8])}{', ...' if len(class_names) > 8 else ''}]"
