"""Rewrite weight-bearing ops (§3): linears by the role of each use, and embeddings.

``linear`` / ``addmm`` / ``mm`` / ``matmul`` with a parameter become ``ops.linear`` with
the scales of the weight's role in *this* use (a tied embedding used as the LM head is
an "output" use there): hidden, input and fixed uses get ``fan_in^-1/2`` forward and
backward (tied); output uses ``alpha_out / fan_in`` forward and ``fan_out^-1/2`` for the
input gradient (cut edge). Fans are read from the weight operand's shape, so they are
right whatever layout the model stores. Every weight-gradient scale gets its reference
size (rows, looked-up indices, broadcast copies) from the example inputs' shapes
(``val``), so it is a constant of the graph (rules §3, "Reference sizes"). FP8-eligible linears call ``umup_fx.runtime.fp8.linear``
when ``Options.fp8`` is on.

Reads: ``umup.rule``, ``umup.weight``, ``umup.transposed``, ``umup.fp8``; ``val`` shapes;
graph keys ``plan``, ``options``.
Writes: swaps those nodes' targets to ``umup_fx.runtime.ops.linear`` / ``umup_fx.runtime.fp8.linear`` /
``embedding``.
Fails when: never (an ``addmm`` with beta/alpha != 1 is left as is and listed).
"""

from __future__ import annotations

import math

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from umup_fx import meta, rules
from umup_fx.runtime import fp8, ops

from ._graph import ops as aten_ops
from ._graph import where
from ._rewrite import (
    arg,
    example_numel,
    example_rows,
    example_size,
    insert_call,
    nodes_with_rule,
    shape_of,
    swap,
)
from .match import copy_sizes

_LINEAR = aten_ops("linear")
_ADDMM = aten_ops("addmm")
_INDEX = aten_ops("index.Tensor")
_CONVOLUTION = aten_ops("convolution")


def _use_role(plan, weight: str, node: fx.Node) -> str:
    """The role of this use of ``weight`` (tied weights differ per use)."""
    p = plan.params[weight]
    if len(p.uses) > 1:
        for use in p.uses:
            if use.node == node.name:
                return use.role
    return p.role


def scale_linears(gm: fx.GraphModule) -> PassResult:
    """Swap every linear-rule node for the scaled linear of its role."""
    g = meta.graph_meta(gm)
    plan, options = g[meta.PLAN], g[meta.OPTIONS]
    changed = False
    for node in nodes_with_rule(gm, rules.LINEAR):
        if meta.get(node, meta.EINSUM):
            _scale_einsum(plan, node)
            changed = True
            continue
        if meta.get(node, meta.GROUPED):
            _scale_grouped(plan, options, node)
            changed = True
            continue
        if node.target in _ADDMM:
            if arg(node, "beta", 1) != 1 or arg(node, "alpha", 1) != 1:
                g[meta.UNCOVERED].append((node.name, "addmm with beta/alpha", "kept unscaled"))
                continue
            bias, x, w = node.args[:3]
        elif node.target in _LINEAR:
            x, w, bias = node.args[0], node.args[1], arg(node, "bias")
        else:  # mm / matmul: x @ W
            (x, w), bias = node.args[:2], None
        transposed = bool(meta.get(node, meta.TRANSPOSED))  # the operand is [in, out]
        w_shape = shape_of(w)
        fan_in, fan_out = (w_shape[-2], w_shape[-1]) if transposed else (w_shape[1], w_shape[0])
        kwargs = {**_scales(plan, node, fan_in, fan_out), "weight_transposed": transposed,
                  "rows": example_rows(x)}
        if options.fp8 != "off" and meta.get(node, meta.FP8):
            kwargs.update(mode=options.fp8, name=meta.get(node, meta.WEIGHT))
            swap(node, fp8.linear, (x, w, bias), kwargs)
        else:
            swap(node, ops.linear, (x, w, bias), kwargs)
        changed = True
    return PassResult(gm, changed)


def _scales(plan, node: fx.Node, fan_in: int, fan_out: int) -> dict[str, float]:
    if _use_role(plan, meta.get(node, meta.WEIGHT), node) == rules.OUTPUT:
        # alpha_out is the LM head's; an MoE router is a readout with multiplier 1 (§10)
        mult = 1.0 if meta.get(node, meta.MOE) else plan.hparams.output_mult
        out_scale, grad_scale = ops.readout_linear_scales(fan_in, fan_out, mult)
    else:
        out_scale, grad_scale = ops.hidden_linear_scales(fan_in)
    return {"out_scale": out_scale, "grad_input_scale": grad_scale}


def _scale_grouped(plan, options, node: fx.Node) -> None:
    """MoE experts ``op(x, W[E, in, out], offs)``: ``ops.grouped_linear`` (or its FP8
    twin), with per-expert fans; the op's other arguments pass through."""
    x, w, *rest = node.args
    shape = shape_of(w)
    kwargs = {**_scales(plan, node, shape[-2], shape[-1]), "rows": example_rows(x), **node.kwargs}
    fn = ops.grouped_linear
    if options.fp8 != "off" and meta.get(node, meta.FP8):
        fn = fp8.grouped_linear
        kwargs.update(mode=options.fp8, name=meta.get(node, meta.WEIGHT))
    swap(node, fn, (meta.get(node, meta.GROUPED), x, w, *rest), kwargs)


def _scale_einsum(plan, node: fx.Node) -> None:
    """``einsum(eq, x, W)`` with W a weight: ``ops.einsum_linear``, fans from the letters."""
    subs, out, i = meta.get(node, meta.EINSUM)
    w_subs, x_subs = subs[i], subs[1 - i]
    x, w = node.args[1][1 - i], node.args[1][i]
    sizes = dict(zip(w_subs, shape_of(w), strict=True))
    fan_in = math.prod(sizes[c] for c in w_subs if c in x_subs and c not in out)
    fan_out = math.prod(sizes[c] for c in w_subs if c in out and c not in x_subs)
    uses = [example_size(n) for c, n in zip(x_subs, shape_of(x), strict=True) if c not in w_subs]
    rows = None if None in uses else math.prod(uses)  # each weight entry's uses (B)
    kwargs = {**_scales(plan, node, fan_in, fan_out), "rows": rows}
    swap(node, ops.einsum_linear, (node.args[0], x, w, i == 0), kwargs)


def scale_convs(gm: fx.GraphModule) -> PassResult:
    """Swap conv1d/2d/3d with a parameter weight for ``ops.conv`` (the linear rule with
    fan_in = C_in/groups * prod(kernel)); a transposed convolution is listed, unscaled."""
    g = meta.graph_meta(gm)
    changed = False
    for node in nodes_with_rule(gm, rules.CONV):
        x, w = node.args[:2]
        if node.target in _CONVOLUTION:
            stride, padding, dilation, transposed, _, groups = node.args[3:9]
            if transposed:
                g[meta.UNCOVERED].append((node.name, "transposed convolution", where(node)))
                continue
        else:
            stride, padding = arg(node, "stride", 1), arg(node, "padding", 0)
            dilation, groups = arg(node, "dilation", 1), arg(node, "groups", 1)
        shape = shape_of(w)
        scales = _scales(g[meta.PLAN], node, math.prod(shape[1:]), shape[0])
        out = example_numel(node)  # [N, C_out, *positions]: B = numel / C_out
        scales["rows"] = None if out is None else out // shape[0]
        swap(node, ops.conv, (x, w, arg(node, "bias"), stride, padding, dilation, groups), scales)
        changed = True
    return PassResult(gm, changed)


def scale_embeddings(gm: fx.GraphModule) -> PassResult:
    """Swap ``aten.embedding`` and ``W[ids]`` for ``ops.embedding`` (weight grad x
    (V / indices)^1/2)."""
    nodes = nodes_with_rule(gm, rules.EMBEDDING)
    for node in nodes:
        if node.target in _INDEX:  # W[ids]
            indices = node.args[1][0]
            swap(node, ops.embedding, (indices, node.args[0], None),
                 {"num_indices": example_numel(indices)})
            continue
        weight, indices = node.args[:2]
        padding_idx = arg(node, "padding_idx", -1)
        swap(node, ops.embedding, (indices, weight, None if padding_idx == -1 else padding_idx),
             {"num_indices": example_numel(indices)})
    return PassResult(gm, bool(nodes))


def scale_direct_params(gm: fx.GraphModule) -> PassResult:
    """Parameters used as values (rules §3, "parameters used directly"): an added table's
    gradient x (numel / broadcast numel)^1/2 (``ops.broadcast_param``), an expanded
    token's x (numel / expanded numel)^1/2 (``ops.expand_param``); concatenated or
    normalised as is."""
    by_name = {n.name: n for n in gm.graph.nodes}
    changed = False
    for node in list(gm.graph.nodes):
        use = meta.get(node, meta.DIRECT) if node.op == "placeholder" else None
        if not use or use["kind"] in ("cat", "norm"):  # unscaled: as is / the norm's
            continue
        op, operand = by_name[use["op"]], by_name[use["operand"]]
        if use["kind"] == "expand":  # expand(sizes), or repeat(times) of size-1 axes
            swap(op, ops.expand_param, (op.args[0], copy_sizes(op) or op.args[1],
                                        example_numel(op)))
        else:
            other = op.args[1] if op.args[0] is operand else op.args[0]
            scaled = insert_call(gm, op, ops.broadcast_param, (operand, other, example_numel(op)),
                                 like=operand)
            op.replace_input_with(operand, scaled)
        changed = True
    return PassResult(gm, changed)
