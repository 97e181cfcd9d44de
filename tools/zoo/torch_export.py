"""Export a torch module with either ONNX exporter and check it against torch in onnxruntime.

Both exporters are used on purpose: the dynamo exporter (torch.export + onnxscript) and the TorchScript
exporter produce very different graphs for the same module, and graphopt must handle both.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .spec import ZooModel, make_inputs

log = logging.getLogger(__name__)

OPSET = 18
#: Exported outputs must match torch within ``ATOL + RTOL * |torch|`` at both test shapes.
ATOL = 1e-4
RTOL = 1e-4
#: A factory turns a model's config into an eval-mode module (and optional sidecar extras).
_NOISY_LOGGERS = ("torch.onnx", "onnxscript", "onnx_ir")
TorchFactory = Callable[[Mapping[str, Any]], "tuple[Any, dict[str, Any]]"]


class ExportMismatchError(RuntimeError):
    """The exported model does not reproduce the torch module's outputs."""


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """Silence the exporters' deprecation chatter and per-pass INFO logs; real errors still raise."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING if lg.name != "torch.onnx" else logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _dynamic_shapes(model: ZooModel) -> tuple[dict[int, Any], ...]:
    """torch.export Dims per input, one shared Dim object per axis name (so batch is tied across inputs)."""
    import torch

    limits = dict(model.config.get("dim_max", {}))
    dims: dict[str, Any] = {}
    shapes = []
    for spec in model.inputs.values():
        axes = {}
        for axis, axis_name in spec.dynamic_axes.items():
            if axis_name not in dims:
                dims[axis_name] = torch.export.Dim(axis_name, min=1, max=limits.get(axis_name, 4096))
            axes[axis] = dims[axis_name]
        shapes.append(axes)
    return tuple(shapes)


def export(module: Any, model: ZooModel, path: Path) -> None:
    """Write ``module`` to ``path`` with ``model.exporter``, marking the spec's dynamic axes."""
    import torch

    module.eval()
    args = tuple(torch.from_numpy(a) for a in make_inputs(model, seed=0).values())
    with _quiet_export(), torch.no_grad():
        if model.exporter == "dynamo":
            _export_dynamo(module, args, model, path)
        elif model.exporter == "torchscript":
            _export_torchscript(module, args, model, path)
        else:
            raise ValueError(f"{model.name}: exporter {model.exporter!r} is not a torch exporter")
    module.eval()  # the TorchScript exporter restores the *wrapper's* mode on exit; stay in eval


def _export_dynamo(module: Any, args: tuple[Any, ...], model: ZooModel, path: Path) -> None:
    """Default dynamo export (onnxscript optimizer on, which folds BatchNorm into Conv), weights inline."""
    import torch

    torch.onnx.export(
        module, args, str(path), dynamo=True, opset_version=OPSET, input_names=list(model.inputs),
        output_names=list(model.outputs), dynamic_shapes=_dynamic_shapes(model), external_data=False,
        verbose=False, optimize=True,
    )  # fmt: skip


def _export_torchscript(module: Any, args: tuple[Any, ...], model: ZooModel, path: Path) -> None:
    """TorchScript export in PRESERVE mode (the module is in eval mode, so inference semantics).

    The default EVAL mode fuses BatchNorm into Conv, as the dynamo exporter's optimizer does; PRESERVE
    keeps BatchNormalization nodes so the zoo also has graphs on which a BN-folding pass has work to do.
    """
    import torch

    axes = {n: dict(s.dynamic_axes) for n, s in model.inputs.items() if s.dynamic_axes}
    axes.update({n: dict(a) for n, a in model.outputs.items() if a})
    torch.onnx.export(
        module, args, str(path), dynamo=False, opset_version=OPSET, input_names=list(model.inputs),
        output_names=list(model.outputs), dynamic_axes=axes, training=torch.onnx.TrainingMode.PRESERVE,
        do_constant_folding=True,
    )  # fmt: skip


def verify(module: Any, model: ZooModel, path: Path) -> dict[str, float]:
    """Run the exported file in onnxruntime at the default and the second shape; compare with torch.

    Raises ExportMismatchError naming the output and shapes when any value is off by more than
    ``ATOL + RTOL * |expected|``. Returns the worst absolute error seen, for the sidecar.
    """
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for second in (False, True) if model.is_dynamic else (False,):
        feeds = make_inputs(model, second=second, seed=1)
        got = session.run(list(model.outputs), feeds)
        with torch.no_grad():
            want = module(*(torch.from_numpy(a) for a in feeds.values()))
        want = want if isinstance(want, tuple | list) else (want,)
        for out_name, g, w in zip(model.outputs, got, want, strict=True):
            worst = max(worst, _check_close(model.name, out_name, g, w.numpy(), feeds))
    return {"max_abs_err": worst}


def _check_close(model: str, output: str, got: np.ndarray, want: np.ndarray, feeds: dict) -> float:
    shapes = {k: v.shape for k, v in feeds.items()}
    if got.shape != want.shape:
        raise ExportMismatchError(
            f"{model}: output {output} has shape {got.shape}, torch gives {want.shape} (inputs {shapes})"
        )
    err = np.abs(got.astype(np.float64) - want.astype(np.float64))
    bad = err > ATOL + RTOL * np.abs(want)
    if bad.any():
        raise ExportMismatchError(
            f"{model}: output {output} differs from torch at {int(bad.sum())} places, max abs error "
            f"{err.max():.3g} (inputs {shapes}); the exporter produced a wrong graph"
        )
    return float(err.max()) if err.size else 0.0


def perturb_constant_params(module: Any, seed: int, scale: float = 0.1) -> None:
    """Give every constant parameter tensor (zero biases, unit norm weights) small random values.

    Freshly initialised nets have all-zero biases and identity normalisations, which hide folding
    bugs (adding a zero bias is a no-op) and let the TorchScript exporter deduplicate identical
    initialisers. Trained nets look like this instead.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    stats = [b for n, b in module.named_buffers() if n.endswith(("running_mean", "running_var"))]
    with torch.no_grad():
        for tensor in [*module.parameters(), *stats]:
            if tensor.numel() > 1 and bool((tensor == tensor.flatten()[0]).all()):
                base = tensor.flatten()[0].item()
                value = base + torch.randn(tensor.shape, generator=gen) * scale
                # scales and variances sit at 1 and must stay positive
                tensor.copy_(value.abs() if base > 0 else value)


def build_torch(factory: TorchFactory, model: ZooModel, path: Path) -> dict[str, Any]:
    """Builder for torch-made models: make the module, export it, verify it, report extras."""
    module, extras = factory(model.config)
    export(module, model, path)
    return {**extras, **verify(module, model, path)}
