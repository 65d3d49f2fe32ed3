"""Make a region's graph run on the model's device and dtype, whatever they are.

Capture ran on the shadow (``capture.shadow``): device ``meta`` and dtype float64 in
the graph are its stand-ins for the model's own. This pass turns them into placeholders
that the runner (``runtime.modules``) fills from the module's weights at each call.

Reads: the graph's constant arguments (devices, dtypes, float64 limits).
Writes: new ``umup_device`` / ``umup_dtype`` placeholders and ``rg.inputs`` entries.
Fails when: never.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

from umup_fx.capture.shadow import SHADOW_DEVICE, SHADOW_DTYPE
from umup_fx.runtime.modules import RegionGraph, dtype_limit


def generalize_placement(rg: RegionGraph) -> None:
    """Device ``meta`` and dtype float64 in the graph (the capture's stand-ins for the
    model's own) become placeholders the runner fills from the module's weights."""
    graph = rg.gm.graph
    found: dict[str, fx.Node] = {}

    def stand_in(kind: str) -> fx.Node:
        if kind not in found:
            last_ph = [n for n in graph.nodes if n.op == "placeholder"][-1]
            with graph.inserting_after(last_ph):
                found[kind] = graph.placeholder(f"umup_{kind}")
            rg.inputs.append((kind, None))
        return found[kind]

    def fix(value: Any, user: fx.Node) -> Any:
        if isinstance(value, torch.device) and value.type == SHADOW_DEVICE.type:
            return stand_in("device")
        if value is SHADOW_DTYPE:
            return stand_in("dtype")
        if isinstance(value, float) and value in _SHADOW_LIMITS:
            # torch.finfo(x.dtype).min read on the float64 capture (HF attention masks):
            # the run-time dtype's own limit, or float32 would overflow converting it.
            with graph.inserting_before(user):
                return graph.call_function(dtype_limit, (stand_in("dtype"), _SHADOW_LIMITS[value]))
        if isinstance(value, (list, tuple)):
            return type(value)(fix(v, user) for v in value)
        if isinstance(value, dict):
            return {k: fix(v, user) for k, v in value.items()}
        return value

    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is _ASSERT_METADATA:
            graph.erase_node(node)  # export's own check of the capture's stand-ins
        elif node.op == "call_function" and node.target is not dtype_limit:
            node.args = fix(tuple(node.args), node)
            node.kwargs = fix(dict(node.kwargs), node)
    for node in list(graph.nodes):
        if node.op == "call_function" and isinstance(node.target, torch._ops.HigherOrderOperator):
            for a in node.args:
                if isinstance(a, fx.Node) and a.op == "get_attr":
                    sub = getattr(rg.gm, a.target)
                    if isinstance(sub, fx.GraphModule):
                        for i in _generalize_subgraph(sub):
                            _cast_output(graph, node, i, stand_in("dtype"))
    rg.gm.recompile()


_F64 = torch.finfo(SHADOW_DTYPE)
_SHADOW_LIMITS = {_F64.min: "min", _F64.max: "max"}


_ASSERT_METADATA = getattr(torch.ops.aten, "_assert_tensor_metadata", None)
_ASSERT_METADATA = _ASSERT_METADATA.default if _ASSERT_METADATA is not None else None
_TO_COPY = torch.ops.aten._to_copy.default
_TO_DEVICE = torch.ops.aten.to.device
_TO_DTYPE = torch.ops.aten.to.dtype


def _cast_output(graph: fx.Graph, hop: fx.Node, i: int, dtype: fx.Node) -> None:
    for item in [u for u in hop.users if u.target is operator.getitem and u.args[1] == i]:
        with graph.inserting_after(item):
            cast = graph.call_function(_TO_DTYPE, (item, dtype))
        item.replace_all_uses_with(cast, delete_user_cb=lambda u, c=cast: u is not c)


def _generalize_subgraph(gm: fx.GraphModule) -> list[int]:
    """A higher-order op's subgraph (an autocast or no-grad region) takes no extra
    inputs, so there: casts to the stand-in device keep their input's device (it is
    already the model's), and a cast to the stand-in dtype that is an output of the
    subgraph moves after it (``_cast_output``). Returns those output positions."""
    moved = []
    output = next(n for n in gm.graph.nodes if n.op == "output")
    results = list(output.args[0]) if isinstance(output.args[0], (list, tuple)) else []
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is _ASSERT_METADATA:
            gm.graph.erase_node(node)
        elif node.target is _TO_DEVICE and node.args[1].type == "meta":
            node.target, node.args = _TO_DTYPE, (node.args[0], node.args[2])
        elif node.target is _TO_COPY and getattr(node.kwargs.get("device"), "type", "") == "meta":
            node.kwargs = {k: v for k, v in node.kwargs.items() if k != "device"}
        if (node.target in (_TO_DTYPE, _TO_COPY)
                and (node.args[1:2] == (SHADOW_DTYPE,)
                     or node.kwargs.get("dtype") is SHADOW_DTYPE)
                and set(node.users) == {output} and node in results):
            moved.append(results.index(node))
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.recompile()
    return moved
