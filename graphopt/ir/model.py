"""Model and model-local functions: the top of the IR."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from .graph import Graph, Node
from .types import Attr


@dataclass
class Function:
    """A model-local function (ONNX FunctionProto); its body is a Graph."""

    domain: str
    name: str
    graph: Graph
    attributes: list[str] = field(default_factory=list)
    attribute_defaults: dict[str, Attr] = field(default_factory=dict)
    opset_imports: dict[str, int] = field(default_factory=dict)
    overload: str = ""
    doc_string: str = ""
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str, str]:
        """How nodes refer to the function: (domain, name, overload)."""
        return (self.domain, self.name, self.overload)


@dataclass
class Model:
    """An ONNX model: the main graph plus everything around it that must survive a round trip."""

    graph: Graph
    ir_version: int = 10
    opset_imports: dict[str, int] = field(default_factory=lambda: {"": 21})
    producer_name: str = ""
    producer_version: str = ""
    domain: str = ""
    model_version: int = 0
    doc_string: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    functions: list[Function] = field(default_factory=list)
    # ModelProto fields graphopt does not model (training_info, configuration),
    # kept as serialized bytes by field number so they round-trip untouched.
    extras: dict[int, list[bytes]] = field(default_factory=dict)
    # Where the model was loaded from: resolves external data, and saving over it is refused.
    base_dir: str | None = None
    source_path: str | None = None

    def opset(self, domain: str = "") -> int | None:
        """The imported opset version of ``domain`` ("" and "ai.onnx" are the same)."""
        if domain in ("", "ai.onnx"):
            return self.opset_imports.get("", self.opset_imports.get("ai.onnx"))
        return self.opset_imports.get(domain)

    def graphs(self) -> Iterator[Graph]:
        """The main graph, function bodies, and every subgraph nested in them."""
        yield from self.graph.walk_graphs()
        for function in self.functions:
            yield from function.graph.walk_graphs()

    def nodes(self) -> Iterator[Node]:
        for graph in self.graphs():
            yield from graph

    def function(self, node: Node) -> Function | None:
        """The model-local function a node calls, if any."""
        for function in self.functions:
            if function.key == (node.domain, node.op_type, node.overload):
                return function
        return None
