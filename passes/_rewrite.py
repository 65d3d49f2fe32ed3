"""Helpers the rewrite passes share: read ATen arguments by name, swap an op in place.

A rewrite changes a node's target and arguments *in place*: its name, its users and its
metadata (``val``, stack trace, the ``umup`` keys) stay, so names in the plan keep
pointing at the right nodes and the before/after graphs line up name for name.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from umup_fx import meta


def arg(node: fx.Node, name: str, default: Any = None) -> Any:
    """The value of an ATen op's argument by schema name (positional or keyword)."""
    if name in node.kwargs:
        return node.kwargs[name]
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return default
    for i, a in enumerate(schema.arguments):
        if a.name == name:
            if i < len(node.args):
                return node.args[i]
            return a.default_value if a.has_default_value() else default
    return default


def swap(node: fx.Node, fn: Callable[..., Any], args: tuple, kwargs: dict | None = None) -> fx.Node:
    """Make ``node`` call ``fn(*args, **kwargs)`` instead of its op (same name and users)."""
    node.target = fn
    node.args = tuple(args)
    node.kwargs = dict(kwargs or {})
    return node


def insert_call(
    gm: fx.GraphModule,
    before: fx.Node,
    fn: Callable[..., Any],
    args: tuple,
    kwargs: dict | None = None,
    like: fx.Node | None = None,
) -> fx.Node:
    """A new ``fn(*args)`` node before ``before``; its ``val`` copied from ``like``."""
    with gm.graph.inserting_before(before):
        new = gm.graph.call_function(fn, tuple(args), dict(kwargs or {}))
    if like is not None and "val" in like.meta:
        new.meta["val"] = like.meta["val"]
    return new


def getitem(gm: fx.GraphModule, before: fx.Node, tup: fx.Node, i: int, like: fx.Node) -> fx.Node:
    return insert_call(gm, before, operator.getitem, (tup, i), like=like)


def shape_of(node: Any) -> tuple[Any, ...]:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else ()


def example_size(size: Any) -> int | None:
    """The example inputs' value of a (possibly symbolic) size: the *reference size* a
    rewritten graph's scales are fixed at (rules §3). None when unknown (data-dependent)."""
    hint = getattr(getattr(size, "node", None), "hint", None)
    try:
        return int(hint if hint is not None else size)
    except (TypeError, ValueError, RuntimeError):
        return None


def example_numel(node: Any) -> int | None:
    """Number of elements of ``node``'s value at the example inputs (None if unknown)."""
    sizes = [example_size(d) for d in shape_of(node)]
    return None if None in sizes or not isinstance(node, fx.Node) else math.prod(sizes)


def example_rows(node: Any) -> int | None:
    """Rows of ``node``'s value at the example inputs: numel / last dim (B in the rules)."""
    numel, shape = example_numel(node), shape_of(node)
    last = example_size(shape[-1]) if shape else None
    return None if numel is None or not last else numel // last


def nodes_with_rule(gm: fx.GraphModule, *rule_names: str) -> list[fx.Node]:
    """Snapshot (safe to rewrite while iterating) of the nodes carrying these rules."""
    return [n for n in gm.graph.nodes if meta.get(n, meta.RULE) in rule_names]


def ancestors(node: fx.Node) -> set[fx.Node]:
    """Every node ``node`` depends on (not including itself)."""
    seen: set[fx.Node] = set()
    stack = list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def training_flag(gm: fx.GraphModule, captured: Any = True) -> Any:
    """The placeholder that carries ``module.training`` (added on first use).

    Export bakes the train/eval mode into dropout ops; the rewritten graph reads it at
    call time instead, so ``model.eval()`` turns dropout off as users expect. Graphs
    from Dynamo (``static_mode``) are recompiled per mode, so they keep ``captured``.
    """
    g = meta.graph_meta(gm)
    if g.get(meta.STATIC_MODE):
        return captured
    name = g.get(meta.TRAINING)
    if name is not None:
        return next(n for n in gm.graph.nodes if n.name == name)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    with gm.graph.inserting_after(placeholders[-1]):
        flag = gm.graph.placeholder("umup_training")
    meta.node_meta(flag)[meta.KIND] = "training"
    g[meta.TRAINING] = flag.name
    return flag


def wrap_output(gm: fx.GraphModule, node: fx.Node, fn: Callable[..., Any], *extra: Any) -> fx.Node:
    """Insert ``fn(node, *extra)`` right after ``node`` and move its users onto it."""
    with gm.graph.inserting_after(node):
        new = gm.graph.call_function(fn, (node, *extra))
    new.meta["val"] = node.meta.get("val")
    node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    return new
