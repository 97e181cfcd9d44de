"""Control flow that comes out of torch: ``torch.cond`` (dynamo exporter -> If) and a scripted loop
(TorchScript exporter -> Loop with an If inside). The two exporters cannot take each other's form, so
the family has one module per exporter; both compute a data-dependent function of a linear layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .torch_export import perturb_constant_params


class CondNet(nn.Module):
    """h = linear(x); relu(h) + x if sum(h) > 0 else tanh(h) - x, via torch.cond."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(features, features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear(x)
        return torch.cond(h.sum() > 0, _relu_plus, _tanh_minus, (h, x))


def _relu_plus(h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.relu(h) + x


def _tanh_minus(h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(h) - x


@torch.jit.script
def _iterate(x: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        if bool(x.sum() > 0):
            x = x * 0.5 - 1.0
        else:
            x = x + torch.tanh(x)
    return x


class ScriptedLoopNet(nn.Module):
    """h = linear(x), then ``steps`` iterations of a data-dependent update (a scripted function)."""

    def __init__(self, features: int, steps: int) -> None:
        super().__init__()
        self.linear = nn.Linear(features, features)
        self.steps = steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _iterate(self.linear(x), self.steps)


def make_control_flow(cfg: Mapping[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    torch.manual_seed(cfg["seed"])
    model = CondNet(cfg["features"]) if cfg["form"] == "cond" else ScriptedLoopNet(cfg["features"], cfg["steps"])
    perturb_constant_params(model, cfg["seed"])
    return model.eval(), {}
