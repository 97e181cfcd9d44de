"""Channel dependency analysis: which channels of which tensors must be removed together.

Starting from the output channels of every Conv/ConvTranspose/Gemm/MatMul, a
worklist follows each channel axis (a *dim*: value name and axis) through the
rules of the nodes that produce and read it (``rules.py``, ``layout.py``), in
both directions, so a residual Add pulls in the other branch and a shared
weight pulls in its other users. Each rule's axis class becomes links between
individual elements, and the connected components of the element graph are
the *atoms* that can only go as a whole: one channel of a plain conv chain, a
channel plus its H*W features after a Flatten, a whole attention head.

Atoms that touch exactly the same dims form a *group*, the unit that
importance ranks and the ratio applies to: the 64 channels of a residual
stream, the channels one branch contributes to a Concat. Graph inputs and
outputs, protected nodes and anything a rule does not understand *block* the
dims they touch; a group touching a blocked dim is left alone, and the report
says which node blocked it and why. networkx gives the dim-level components
(which layers are coupled), numpy the element-level ones.
"""

from __future__ import annotations

import functools
import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import networkx as nx
import numpy as np

from graphopt.errors import GraphoptError
from graphopt.ir import Model, Node, Value

from . import layout  # noqa: F401 - registers the layout rules
from .probe import ShapeTable
from .rules import W_IN, W_OUT, AxisClass, NodeView, classes_for

log = logging.getLogger(__name__)

DimKey = tuple[str, int]
WEIGHTED = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": -1}  # op -> output channel axis


@dataclass
class DimInfo:
    """One channel-carrying axis of one value and its place in the element id space."""

    key: DimKey
    value: Value
    size: int
    base: int
    roles: list[tuple[Node, str]] = field(default_factory=list)

    @property
    def is_const(self) -> bool:
        return self.value.const is not None


@dataclass
class ChannelGroup:
    """Atoms with the same footprint; ``pos[dim][e]`` is the atom of element ``e`` (-1: another group's)."""

    id: int
    dims: list[DimKey]
    pos: dict[DimKey, np.ndarray]
    n: int
    blocked: list[tuple[str, str]] = field(default_factory=list)
    producers: list[str] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)
    branch: bool = False  # all of it may go, with the residual branch it lies in (branches.py)

    @property
    def prunable(self) -> bool:
        return not self.blocked and bool(self.producers) and self.n > 1

    @property
    def name(self) -> str:
        label = self.producers[0] if self.producers else self.dims[0][0]
        more = len(self.producers) - 1
        return f"{label} (+{more} coupled)" if more > 0 else label

    def width(self, dim: DimKey) -> float:
        """Elements per atom in ``dim`` (a channel's H*W features after a Flatten, a head's head_dim)."""
        return float((self.pos[dim] >= 0).sum()) / max(self.n, 1)

    def primary_dim(self, analysis: Analysis) -> DimKey:
        """The first producer's output channels: what "channels" means in the report."""
        for key in self.dims:
            if any(role == W_OUT for _, role in analysis.dims[key].roles):
                return key
        return self.dims[0]


@dataclass
class Analysis:
    model: Model
    shapes: ShapeTable
    dims: dict[DimKey, DimInfo]
    groups: list[ChannelGroup]
    blocked: dict[DimKey, list[tuple[str, str]]]
    fixups: dict[str, Node]
    coupling: nx.Graph  # dims linked by some node's axis class

    @functools.cached_property
    def nodes(self) -> dict[str, Node]:
        """The main graph's nodes by label (how groups name their layers), as analysed."""
        return {node.label(): node for node in self.model.graph}

    def coupled_layers(self, group: ChannelGroup) -> list[set[DimKey]]:
        """The dim-level components the group's dims fall in (networkx)."""
        return [c for c in nx.connected_components(self.coupling.subgraph(group.dims))]


@dataclass
class _Link:
    dim: DimKey
    ids: np.ndarray | None
    vbase: int
    size: int


class _Walker:
    """The worklist over dims; see the module docstring."""

    def __init__(self, model: Model, shapes: ShapeTable, protected: set[str]) -> None:
        self.model, self.graph, self.shapes, self.protected = model, model.graph, shapes, protected
        self.values = {v.name: v for v in self.graph.values()}
        self.dims: dict[DimKey, DimInfo] = {}
        self.blocked: dict[DimKey, list[tuple[str, str]]] = {}
        self.links: list[_Link] = []
        self.classes: dict[int, list[AxisClass] | str] = {}
        self.done: set[tuple[int, str]] = set()
        self.fixups: dict[str, Node] = {}
        self.coupling = nx.Graph()
        self.next = 0
        self.queue: deque[DimKey] = deque()
        self.opset = model.opset() or 13
        self.roles: list[tuple[DimKey, Node, str]] = []

    def block(self, key: DimKey, node: str, reason: str) -> None:
        entry = (node, reason)
        if entry not in self.blocked.setdefault(key, []):
            self.blocked[key].append(entry)

    def run(self, seeds: Iterable[DimKey]) -> None:
        self.queue.extend(seeds)
        while self.queue:
            self.visit(self.queue.popleft())

    def visit(self, key: DimKey) -> None:
        if key in self.dims:
            return
        value = self.values.get(key[0])
        shape = self.shapes.static(value)
        if value is None or shape is None or shape[key[1]] is None:
            log.debug("dim %s has no static size; skipped", key)
            return
        self.dims[key] = DimInfo(key, value, int(shape[key[1]]), self.next)
        self.next += int(shape[key[1]])
        self.coupling.add_node(key)
        if value.is_graph_input():
            self.block(key, value.name, "model input: its shape is the model's interface")
        if value.is_graph_output():
            self.block(key, value.name, "model output: its shape is the model's interface")
        producer = value.producer
        if producer is not None:
            if producer.label() in self.protected:
                self.block(key, producer.label(), "protected node")
            self.process(producer, ("out", value.index), key)
        for node, index in value.uses():
            if node.graph is not self.graph:
                self.block(key, node.label(), "read inside a subgraph (control flow)")
                continue
            self.process(node, ("in", index), key)

    def process(self, node: Node, port: tuple[str, int], key: DimKey) -> None:
        classes = self.classes.get(id(node))
        if classes is None:
            classes = classes_for(NodeView(node, self.shapes, {"opset": self.opset}))
            self.classes[id(node)] = classes
        if isinstance(classes, str):
            self.block(key, node.label(), classes)
            return
        found = next((c for c in classes for m in c.members if m.port == port and m.axis == key[1]), None)
        if found is None:
            self.block(key, node.label(), f"{node.op_type} does not carry axis {key[1]} of its {port[0]}put {port[1]}")
            return
        if found.blocked:
            self.block(key, node.label(), found.blocked)
            return
        if (id(node), found.name) in self.done:
            return
        self.done.add((id(node), found.name))
        vbase, self.next = self.next, self.next + found.size
        if found.fixup:
            self.fixups[node.name or str(id(node))] = node
        first = None
        for member in found.members:
            seq = node.inputs if member.port[0] == "in" else node.outputs
            value = seq[member.port[1]]
            mkey = (value.name, member.axis % max(len(self.shapes.static(value) or ()), 1))
            self.links.append(_Link(mkey, member.ids, vbase, found.size))
            if member.role:
                self.roles.append((mkey, node, member.role))
            self.queue.append(mkey)
            if first is None:
                first = mkey
            else:
                self.coupling.add_edge(first, mkey)

    def edges(self) -> tuple[np.ndarray, np.ndarray]:
        src, dst = [], []
        for link in self.links:
            dim = self.dims.get(link.dim)
            if dim is None:
                continue
            ids = np.arange(dim.size) if link.ids is None else np.asarray(link.ids)
            if ids.shape[0] != dim.size:
                raise AssertionError(f"rule maps {ids.shape[0]} elements onto {link.dim} of size {dim.size}")
            keep = ids >= 0
            src.append(dim.base + np.nonzero(keep)[0])
            dst.append(link.vbase + ids[keep])
        if not src:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(src).astype(np.int64), np.concatenate(dst).astype(np.int64)


def components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected-component label (the smallest element id) of each of ``n`` elements (hook and compress)."""
    parent = np.arange(n, dtype=np.int64)
    while True:
        pa, pb = parent[a], parent[b]
        if np.array_equal(pa, pb):
            return parent
        low = np.minimum(pa, pb)
        np.minimum.at(parent, pa, low)
        np.minimum.at(parent, pb, low)
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped


def default_protected(model: Model) -> list[str]:
    """The first conv (its output feeds everything; pruning it hurts most) and the layers producing outputs,
    by label (the node name, or a description of an unnamed node)."""
    names = []
    first_conv = next((n for n in model.graph if n.op_type == "Conv"), None)
    if first_conv is not None:
        names.append(first_conv.label())
    for out in model.graph.outputs:
        if out.producer is not None and out.producer.op_type in WEIGHTED:
            names.append(out.producer.label())
    return names


def analyze(model: Model, shapes: ShapeTable, protect: Iterable[str] = ()) -> Analysis:
    """Find the channel groups of ``model``'s main graph (see the module docstring)."""
    protected = set(protect)
    known = {n.label() for n in model.graph}
    if missing := sorted(protected - known):
        raise GraphoptError(f"no node named {', '.join(map(repr, missing))} to protect",
                            hint="give node names as `graphopt inspect --json` or Netron show them")
    walker = _Walker(model, shapes, protected)
    seeds = []
    for node in model.graph:
        axis = WEIGHTED.get(node.op_type)
        if axis is None or node.domain not in ("", "ai.onnx") or not node.outputs:
            continue
        shape = shapes.static(node.outputs[0])
        if shape and shape[axis] is not None and shape[axis] > 1:
            seeds.append((node.outputs[0].name, axis % len(shape)))
    walker.run(seeds)
    for key, node, role in walker.roles:
        if key in walker.dims:
            walker.dims[key].roles.append((node, role))
    a, b = walker.edges()
    labels = components(walker.next, a, b)
    groups = _groups(walker, labels)
    analysis = Analysis(model, shapes, walker.dims, groups, walker.blocked, walker.fixups, walker.coupling)
    from .branches import branch_problem  # branches reads an Analysis

    for group in groups:
        group.branch = branch_problem(analysis, group) is None
    log.info("channel analysis: %d dims, %d groups (%d prunable, %d whole branches)", len(walker.dims), len(groups),
             sum(g.prunable for g in groups), sum(g.branch for g in groups))
    return analysis


def _groups(walker: _Walker, labels: np.ndarray) -> list[ChannelGroup]:
    footprint: dict[int, list[DimKey]] = {}
    dims = sorted(walker.dims.values(), key=lambda d: d.base)
    for dim in dims:
        for atom in np.unique(labels[dim.base: dim.base + dim.size]).tolist():
            footprint.setdefault(atom, []).append(dim.key)
    by_sig: dict[tuple[DimKey, ...], list[int]] = {}
    for atom, sig in footprint.items():
        by_sig.setdefault(tuple(sig), []).append(atom)
    group_of = np.full(walker.next, -1, dtype=np.int64)
    index_of = np.full(walker.next, -1, dtype=np.int64)
    groups = []
    for gid, (sig, atoms) in enumerate(by_sig.items()):
        atoms = sorted(atoms)
        group_of[atoms] = gid
        index_of[atoms] = np.arange(len(atoms))
        group = ChannelGroup(gid, list(sig), {}, len(atoms))
        for key in sig:
            for entry in walker.blocked.get(key, []):
                if entry not in group.blocked:
                    group.blocked.append(entry)
            for node, role in walker.dims[key].roles:
                target = group.producers if role == W_OUT else group.consumers if role == W_IN else None
                if target is not None and node.label() not in target:
                    target.append(node.label())
        groups.append(group)
    for dim in dims:
        lab = labels[dim.base: dim.base + dim.size]
        for gid in np.unique(group_of[lab]).tolist():
            groups[gid].pos[dim.key] = np.where(group_of[lab] == gid, index_of[lab], -1)
    return groups
