"""The transformer fusions on real exported graphs: both PyTorch exporters, BERT, MiniLM (real weights),
ViT, GPT-2. After the simplification passes, every LayerNorm, GELU and attention block must fuse, and
the result must match the original in onnxruntime at the zoo's input shape and at a second shape
(batch and sequence stay dynamic)."""

from __future__ import annotations

import importlib
from collections import Counter

import pytest

import graphopt
from graphopt.pipeline import available_passes
from graphopt.verify import verify_models

for _module in ("norm", "gelu", "attention", "residual"):
    importlib.import_module(f"graphopt.passes.fusion.{_module}")
for _module in ("simplify", "simplify.noop", "simplify.cse"):  # others' passes, registered on import
    try:
        importlib.import_module(f"graphopt.passes.{_module}")
    except ImportError:  # pragma: no cover - until they land
        pass

SIMPLIFY = ["lift-constants", "remove-identity", "infer-shapes", "fold-constants", "fold-shapes", "eliminate-noops",
            "eliminate-common-subexpressions"]
FUSE = ["fuse-layer-norm", "fuse-rms-norm", "fuse-gelu", "fuse-silu", "fuse-attention", "pack-qkv-attention",
        "fold-residual-bias"]
CLEANUP = ["eliminate-dead-nodes", "remove-unused-initializers"]

# layers -> attention blocks; LayerNorms: 2 per layer + embeddings (BERT, MiniLM) or final (ViT, GPT-2)
BLOCKS = {"bert": (2, "BiasGelu"), "minilm": (6, "BiasGelu"), "vit": (2, "BiasGelu"), "gpt2": (2, "FastGelu")}
POST_LN = {"bert", "minilm"}  # a residual block's bias can ride in the stream; ViT and GPT-2 normalize first
MODELS = [f"{family}_{exporter}" for family in BLOCKS for exporter in ("torchscript", "dynamo")]


def pipeline() -> list[str]:
    known = available_passes()
    return [p for p in SIMPLIFY + FUSE + CLEANUP if p in known]


@pytest.mark.parametrize("name", MODELS)
def test_zoo_transformer_fuses_and_matches(zoo, name: str):
    path = zoo.build(name)
    model = graphopt.load(path)
    report = graphopt.optimize(model, pipeline()).pipeline
    ops = Counter(n.op_type for n in model.graph)
    family = name.rsplit("_", 1)[0]
    layers, gelu = BLOCKS[family]
    # both residual blocks of every post-LN layer lose their bias Add; a pre-LN block has nothing to carry it
    assert report.stats["fold-residual-bias"].changes == (2 * layers if family in POST_LN else 0)
    assert ops["LayerNormalization"] == 2 * layers + 1, ops
    assert ops[gelu] == layers, ops
    assert ops["Attention"] == layers, ops  # packed q/k/v: three MatMuls (BERT, ViT) or GPT-2's Gemm + Split
    assert ops["Softmax"] == 0 and ops["Erf"] == 0 and ops["Tanh"] == 0, ops
    fused = graphopt.to_bytes(model)
    for second in (False, True):
        feeds = zoo.make_inputs(zoo.MODELS[name], second=second)
        report = verify_models(str(path), fused, inputs=feeds)
        assert report.ok, f"{name} ({'second' if second else 'primary'} shape): {report.summary()}"
