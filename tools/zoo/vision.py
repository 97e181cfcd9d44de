"""CNNs: a digits classifier trained for real, and ResNet / MobileNetV2 shaped nets with random weights.

torchvision is not a dependency, so the architectures are written here (they follow the papers'
layouts: ResNet basic/bottleneck blocks, MobileNetV2 inverted residuals with depthwise convs and ReLU6).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .data import digits_split
from .torch_export import perturb_constant_params

log = logging.getLogger(__name__)


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


# ----------------------------------------------------------------------------------------------- digits


class DigitsCNN(nn.Module):
    """Three conv layers and two linear layers for 8x8 digits (inputs scaled to [0, 1])."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *conv_bn(1, w, 3),
            nn.ReLU(),
            *conv_bn(w, 2 * w, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            *conv_bn(2 * w, 4 * w, 3),
            nn.ReLU(),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(4 * w * 16, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 10)
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images))


def _train(model: nn.Module, images: np.ndarray, labels: np.ndarray, cfg: Mapping[str, Any]) -> None:
    gen = torch.Generator().manual_seed(cfg["seed"])
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    model.train()
    for _epoch in range(cfg["epochs"]):
        for idx in torch.randperm(len(x), generator=gen).split(cfg["batch"]):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()


def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(images)).argmax(1).numpy() == labels).mean())


@functools.cache
def _trained_digits(cfg_json: str) -> tuple[DigitsCNN, float]:
    """Train once per process: both exporters of ``digits_cnn`` share the weights."""
    cfg = json.loads(cfg_json)
    torch.manual_seed(cfg["seed"])
    data = digits_split(cfg["split_seed"])
    model = DigitsCNN(cfg["width"])
    _train(model, data["train_images"], data["train_labels"], cfg)
    acc = accuracy(model, data["test_images"], data["test_labels"])
    log.info("digits_cnn: test accuracy %.4f on %d held-out images", acc, len(data["test_labels"]))
    return model, acc


def make_digits(cfg: Mapping[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    model, acc = _trained_digits(json.dumps(dict(cfg), sort_keys=True))
    if acc < cfg["min_accuracy"]:
        raise RuntimeError(
            f"digits_cnn reached only {acc:.3f} test accuracy (< {cfg['min_accuracy']}); "
            "training is broken, refusing to cache it"
        )
    return model, {"test_accuracy": acc}


# ----------------------------------------------------------------------------------------------- resnet


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*conv_bn(cin, width, 3, stride), nn.ReLU(), *conv_bn(width, width, 3))
        self.shortcut = _shortcut(cin, width * self.expansion, stride)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class Bottleneck(BasicBlock):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int) -> None:
        nn.Module.__init__(self)
        cout = width * self.expansion
        self.body = nn.Sequential(
            *conv_bn(cin, width, 1), nn.ReLU(), *conv_bn(width, width, 3, stride), nn.ReLU(), *conv_bn(width, cout, 1)
        )
        self.shortcut = _shortcut(cin, cout, stride)
        self.relu = nn.ReLU()


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(*conv_bn(cin, cout, 1, stride))


class ResNet(nn.Module):
    """ResNet; ``imagenet_stem`` selects the 7x7/stride-2 + max-pool stem of the paper."""

    def __init__(
        self, bottleneck: bool, layers: Sequence[int], widths: Sequence[int], imagenet_stem: bool, num_classes: int
    ) -> None:
        super().__init__()
        block = Bottleneck if bottleneck else BasicBlock
        stem_width = widths[0]
        if imagenet_stem:
            stem = [*conv_bn(3, stem_width, 7, 2), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
        else:
            stem = [*conv_bn(3, stem_width, 3), nn.ReLU(), nn.MaxPool2d(2)]
        blocks: list[nn.Module] = []
        cin = stem_width
        for stage, (count, width) in enumerate(zip(layers, widths, strict=True)):
            for i in range(count):
                blocks.append(block(cin, width, 2 if i == 0 and stage > 0 else 1))
                cin = width * block.expansion
        self.features = nn.Sequential(*stem, *blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


# -------------------------------------------------------------------------------------------- mobilenet


def _divisible(value: float, divisor: int = 8) -> int:
    """Round channel counts the way MobileNetV2 does (multiple of 8, never below 90 % of the target)."""
    out = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * value else out


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = [] if expand == 1 else [*conv_bn(cin, hidden, 1), nn.ReLU6()]
        layers += [*conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6(), *conv_bn(hidden, cout, 1)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2(nn.Module):
    """``settings`` rows are (expansion t, channels c, repeats n, stride s) as in the paper's table 2."""

    def __init__(self, settings: Sequence[Sequence[int]], width: float, last_channel: int, num_classes: int) -> None:
        super().__init__()
        cin = _divisible(32 * width)
        layers: list[nn.Module] = [*conv_bn(3, cin, 3, 2), nn.ReLU6()]
        for t, c, n, s in settings:
            cout = _divisible(c * width)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        last = _divisible(last_channel * max(1.0, width))
        layers += [*conv_bn(cin, last, 1), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


# ------------------------------------------------------------------------------------------ factories


def calibrate_batchnorm(model: nn.Module, shape: Sequence[int], seed: int, batches: int = 2) -> None:
    """Set BatchNorm running statistics from random images, as if the net had been trained.

    With the default statistics (mean 0, variance 1) eval-mode BN is nearly the identity, which hides
    folding bugs, and activations of a deep random net grow without bound.
    """
    gen = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.reset_running_stats()
            mod.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(tuple(shape), generator=gen))
    model.eval()


def _random_cnn(model: nn.Module, cfg: Mapping[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    perturb_constant_params(model, cfg["seed"])
    size = cfg["image_size"]
    calibrate_batchnorm(model, (cfg["calibration_batch"], 3, size, size), cfg["seed"])
    return model, {}


def make_resnet(cfg: Mapping[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    torch.manual_seed(cfg["seed"])
    model = ResNet(cfg["bottleneck"], cfg["layers"], cfg["widths"], cfg["imagenet_stem"], cfg["num_classes"])
    return _random_cnn(model, cfg)


def make_mobilenet(cfg: Mapping[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    torch.manual_seed(cfg["seed"])
    model = MobileNetV2(cfg["settings"], cfg["width"], cfg["last_channel"], cfg["num_classes"])
    return _random_cnn(model, cfg)
