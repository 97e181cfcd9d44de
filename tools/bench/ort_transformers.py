"""onnxruntime's own transformer fusion tool (``onnxruntime.transformers.optimizer``) as a benchmark peer.

It needs the model family and the attention geometry, which the zoo knows: :func:`ort_transformers_args`
derives them from a zoo entry; :func:`run_ort_transformers` is the adapter a :mod:`.child` process calls.
"""

from __future__ import annotations

import os
from typing import Any

#: zoo family -> onnxruntime.transformers model_type
MODEL_TYPE = {"bert": "bert", "minilm": "bert", "vit": "vit", "gpt2": "gpt2"}
#: all-MiniLM-L6-v2's geometry (the zoo loads its real weights, so its config holds no ``hf`` entry)
MINILM = (12, 384)


def ort_transformers_args(name: str) -> dict[str, Any] | None:
    """``model_type``, ``num_heads`` and ``hidden_size`` for zoo model ``name``; None for non-transformers."""
    from tools.zoo import MODELS

    model = MODELS[name]
    if model.family not in MODEL_TYPE:
        return None
    if model.family == "minilm":
        heads, hidden = MINILM
    else:
        hf = model.config.get("hf", {})
        heads = hf.get("num_attention_heads", hf.get("n_head"))
        hidden = hf.get("hidden_size", hf.get("n_embd"))
    return {"model_type": MODEL_TYPE[model.family], "num_heads": int(heads), "hidden_size": int(hidden)}


def run_ort_transformers(src: str, dst: str, model_type: str, num_heads: int, hidden_size: int) -> dict[str, Any]:
    """Optimize ``src`` with onnxruntime.transformers.optimizer (its default level for the model type)."""
    from onnxruntime.transformers.optimizer import optimize_model

    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    optimized = optimize_model(src, model_type=model_type, num_heads=num_heads, hidden_size=hidden_size)
    optimized.save_model_to_file(dst)
    return {"fused": {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}}
