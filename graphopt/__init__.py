"""graphopt: a graph-level compiler and optimizer for ONNX models.

    import graphopt
    model = graphopt.load("model.onnx")
    result = graphopt.optimize(model)
    graphopt.save(model, "model.opt.onnx")
"""

from .errors import GraphoptError
from .ir import Graph, Model, Node, Value
from .onnx_io import load, save, to_bytes, to_proto
from .optimize import OptimizeResult, optimize

__version__ = "0.1.0"

__all__ = ["Graph", "GraphoptError", "Model", "Node", "OptimizeResult", "Value", "load", "optimize", "save",
           "to_bytes", "to_proto", "__version__"]
