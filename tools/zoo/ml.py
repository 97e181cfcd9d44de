"""Classic ML through skl2onnx: ai.onnx.ml operators (Scaler, LinearClassifier, TreeEnsemble, ZipMap)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .spec import ZooModel

TARGET_OPSET = {"": 18, "ai.onnx.ml": 3}


def split(dataset: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Bundled scikit-learn dataset ("digits" or "iris") as float32 features, 75/25 stratified split."""
    from sklearn.datasets import load_digits, load_iris
    from sklearn.model_selection import train_test_split

    data = {"digits": load_digits, "iris": load_iris}[dataset]()
    x, y = data.data.astype(np.float32), data.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    return {"train_X": x_tr, "train_labels": y_tr, "test_X": x_te, "test_labels": y_te}


def _estimator(cfg: Mapping[str, Any]) -> Any:
    from sklearn.decomposition import PCA
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    if cfg["kind"] == "scaler_pca_logreg":
        return Pipeline(
            [
                ("scaler", StandardScaler()),
                ("pca", PCA(n_components=cfg["pca"], random_state=0)),
                ("clf", LogisticRegression(max_iter=2000)),
            ]
        )
    return Pipeline(
        [
            ("scaler", StandardScaler()),
            ("clf", RandomForestClassifier(n_estimators=cfg["trees"], max_depth=cfg["depth"], random_state=0)),
        ]
    )


def _probabilities(output: Any) -> np.ndarray:
    """ZipMap yields a list of {class: prob} dicts; turn it back into a matrix."""
    if isinstance(output, list):
        return np.array([[row[k] for k in sorted(row)] for row in output], dtype=np.float32)
    return np.asarray(output)


def build_sklearn(model: ZooModel, path: Path) -> dict[str, Any]:
    """Fit the pipeline, convert it, and check labels and probabilities against scikit-learn."""
    import onnxruntime as ort
    from skl2onnx import to_onnx

    cfg = model.config
    data = split(cfg["dataset"])
    pipe = _estimator(cfg).fit(data["train_X"], data["train_labels"])
    options = {id(pipe.steps[-1][1]): {"zipmap": cfg["zipmap"]}}
    proto = to_onnx(pipe, data["train_X"][:1], options=options, target_opset=TARGET_OPSET)
    path.write_bytes(proto.SerializeToString())
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = data["test_X"]
    labels, probs = session.run(list(model.outputs), {"X": x})
    if not np.array_equal(labels, pipe.predict(x)):
        raise AssertionError(f"{model.name}: onnxruntime labels differ from scikit-learn's")
    err = float(np.abs(_probabilities(probs) - pipe.predict_proba(x)).max())
    if err > 1e-4:
        raise AssertionError(f"{model.name}: probabilities differ from scikit-learn's by {err:.3g}")
    accuracy = float((labels == data["test_labels"]).mean())
    return {
        "max_abs_err": err,
        "test_accuracy": accuracy,
        "sklearn_accuracy": float(pipe.score(x, data["test_labels"])),
    }
