"""scikit-learn estimators beyond the zoo's two pipelines, converted by skl2onnx (ai.onnx.ml ops, Scan
bodies that pass a state through, ZipMap sequences of maps), through ``optimize`` (verified on a batch of 8
rows, where the conversion saw one) and through static/dynamic ``quantize`` (the result must run)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import graphopt
from graphopt.passes.quant import QuantConfig, quantize
from graphopt.verify import verify_models

sklearn = pytest.importorskip("sklearn")
skl2onnx = pytest.importorskip("skl2onnx")

from sklearn.cluster import KMeans  # noqa: E402
from sklearn.datasets import load_iris, make_regression  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402
from sklearn.ensemble import (  # noqa: E402
    AdaBoostClassifier,
    BaggingClassifier,
    GradientBoostingClassifier,
    IsolationForest,
    RandomForestRegressor,
)
from sklearn.gaussian_process import GaussianProcessRegressor  # noqa: E402
from sklearn.linear_model import LogisticRegression, Ridge, SGDClassifier  # noqa: E402
from sklearn.naive_bayes import GaussianNB  # noqa: E402
from sklearn.neighbors import KNeighborsClassifier  # noqa: E402
from sklearn.neural_network import MLPClassifier  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import (  # noqa: E402
    KBinsDiscretizer,
    MinMaxScaler,
    PolynomialFeatures,
    RobustScaler,
    StandardScaler,
)
from sklearn.svm import SVC, SVR  # noqa: E402
from sklearn.tree import DecisionTreeClassifier  # noqa: E402

ESTIMATORS = {
    "scaler_logistic": lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)),
    "pca_svc": lambda: make_pipeline(PCA(3), SVC(probability=True, random_state=0)),
    "gradient_boosting": lambda: GradientBoostingClassifier(n_estimators=10, random_state=0),
    "k_neighbors": lambda: KNeighborsClassifier(3),
    "mlp": lambda: MLPClassifier((16,), max_iter=300, random_state=0),
    "tree_without_zipmap": lambda: DecisionTreeClassifier(random_state=0),
    "poly_ridge": lambda: make_pipeline(MinMaxScaler(), PolynomialFeatures(2), Ridge()),
    "forest_regressor": lambda: RandomForestRegressor(5, max_depth=4, random_state=0),
    "svr": lambda: SVR(),
    "sgd": lambda: SGDClassifier(random_state=0),
    "gaussian_process": lambda: GaussianProcessRegressor(),
    "kbins_gaussian_nb": lambda: make_pipeline(KBinsDiscretizer(3, encode="onehot-dense"), GaussianNB()),
    "robust_adaboost": lambda: make_pipeline(RobustScaler(), AdaBoostClassifier(n_estimators=5, random_state=0)),
    "isolation_forest": lambda: IsolationForest(n_estimators=5, random_state=0),
    "kmeans": lambda: KMeans(3, n_init=2, random_state=0),
    "bagging": lambda: BaggingClassifier(n_estimators=3, random_state=0),
}
REGRESSORS = {"poly_ridge", "forest_regressor", "svr", "gaussian_process"}


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_converted_estimator_is_optimized_exactly_and_quantizes(name):
    if name in REGRESSORS:
        x, y = make_regression(100, 6, random_state=0)
    else:
        x, y = load_iris(return_X_y=True)
    x = x.astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        estimator = ESTIMATORS[name]().fit(x, y)
        options = {id(estimator): {"zipmap": False}} if name == "tree_without_zipmap" else None
        model = skl2onnx.to_onnx(estimator, x[:1], options=options, target_opset={"": 17, "ai.onnx.ml": 3})
    data = model.SerializeToString()
    feeds = {model.graph.input[0].name: x[:8]}
    optimized = graphopt.optimize(data).model
    report = verify_models(data, graphopt.to_bytes(optimized), inputs=feeds)
    assert report.ok, [(d.name, d.verdict, d.detail) for d in report.outputs]
    calib = [{model.graph.input[0].name: x[i:i + 8]} for i in range(0, 64, 8)]
    for mode in ("static", "dynamic"):
        quantize(data, calib, QuantConfig(mode=mode, latency_aware=False))  # raises unless onnxruntime runs it
