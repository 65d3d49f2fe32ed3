"""Rewrite weight-bearing ops (§3): linears by the role of each use, and embeddings.

``linear`` / ``addmm`` / ``mm`` / ``matmul`` with a parameter become ``ops.linear`` with
the scales of the weight's role in *this* use (a tied embedding used as the LM head is
an "output" use there): hidden, input and fixed uses get ``fan_in^-1/2`` forward and
backward (tied); output uses ``alpha_out / fan_in`` forward and ``fan_out^-1/2`` for the
input gradient (cut edge). Fans are read from the weight operand's shape, so they are
right whatever layout the model stores. FP8-eligible linears call ``umup_fx.fp8.linear``
when ``Options.fp8`` is on.

Reads: ``umup.rule``, ``umup.weight``, ``umup.transposed``, ``umup.fp8``; graph keys
``plan``, ``options``.
Writes: swaps those nodes' targets to ``umup_fx.ops.linear`` / ``umup_fx.fp8.linear`` /
``embedding``.
Fails when: never (an ``addmm`` with beta/alpha != 1 is left as is and listed).
"""

from __future__ import annotations

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from umup_fx import fp8, meta, ops, rules

from ._graph import ops as aten_ops
from ._rewrite import arg, nodes_with_rule, shape_of, swap

_LINEAR = aten_ops("linear")
_ADDMM = aten_ops("addmm")


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
        if node.target in _ADDMM:
            if arg(node, "beta", 1) != 1 or arg(node, "alpha", 1) != 1:
                g[meta.UNCOVERED].append((node.name, "addmm with beta/alpha", "kept unscaled"))
                continue
            bias, x, w = node.args[:3]
        elif node.target in _LINEAR:
            x, w, bias = node.args[0], node.args[1], arg(node, "bias")
        else:  # mm / matmul: x @ W
            (x, w), bias = node.args[:2], None
        transposed = bool(meta.get(node, meta.TRANSPOSED))
        w_shape = shape_of(w)
        fan_in, fan_out = (w_shape[0], w_shape[1]) if transposed else (w_shape[1], w_shape[0])
        if _use_role(plan, meta.get(node, meta.WEIGHT), node) == rules.OUTPUT:
            out_scale, grad_scale = ops.readout_linear_scales(
                fan_in, fan_out, plan.hparams.output_mult
            )
        else:
            out_scale, grad_scale = ops.hidden_linear_scales(fan_in)
        kwargs = {
            "out_scale": out_scale,
            "grad_input_scale": grad_scale,
            "weight_transposed": transposed,
        }
        if options.fp8 != "off" and meta.get(node, meta.FP8):
            kwargs.update(mode=options.fp8, name=meta.get(node, meta.WEIGHT))
            swap(node, fp8.linear, (x, w, bias), kwargs)
        else:
            swap(node, ops.linear, (x, w, bias), kwargs)
        changed = True
    return PassResult(gm, changed)


def scale_embeddings(gm: fx.GraphModule) -> PassResult:
    """Swap ``aten.embedding`` for ``ops.embedding`` (weight grad x (V / indices)^1/2)."""
    nodes = nodes_with_rule(gm, rules.EMBEDDING)
    for node in nodes:
        weight, indices = node.args[:2]
        padding_idx = arg(node, "padding_idx", -1)
        swap(node, ops.embedding, (indices, weight, None if padding_idx == -1 else padding_idx))
    return PassResult(gm, bool(nodes))
