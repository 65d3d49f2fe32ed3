"""Ops the rules do not cover: listed, never silently ignored.

An op on the activation path (its value depends on a parameter) that has no rule and
is not a pure data movement (views, casts, slicing) or an elementwise product / sum
with a constant (RoPE, masks, which keep scale) passes through unscaled. Each one is
listed with its source line; the report prints them and ``transform`` warns once.

An add of two activations is covered by its rule (residual, plain, sum of tables) or
by ``umup.keeps_scale`` (a rotation, a low-rank update); any other is listed.

Reads: ``umup.rule``, ``umup.norm``, ``umup.attention``, ``umup.weight_norm``,
``umup.keeps_scale``; graph key
``roles``.
Writes: graph key ``uncovered``: list of (node name, op name, source line).
Fails when: never.
"""

from __future__ import annotations

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from umup_fx import meta, rules

from ._graph import (
    ADDS,
    DIVS,
    MULS,
    TRANSPARENT,
    is_tensor,
    op_name,
    ops,
    param_dependent,
    param_of,
    where,
)
from .norms import NORM_OPS

# Data movement and bookkeeping: no arithmetic on values, so nothing to scale.
_PASS_THROUGH = TRANSPARENT | ops(
    "slice.Tensor", "select.int", "split.Tensor", "split_with_sizes", "chunk", "unbind.int",
    "cat", "stack", "index.Tensor", "index_select", "gather", "flatten.using_ints",
    "unflatten.int", "narrow", "repeat", "repeat_interleave.self_int", "roll", "flip",
    "masked_fill.Scalar", "masked_fill.Tensor", "where.self", "where.ScalarOther", "where.ScalarSelf",
    "neg", "pad", "constant_pad_nd",
    "_assert_tensor_metadata", "copy_", "zeros_like", "ones_like", "empty_like",
    "sym_size.int",
    # complex RoPE (torchtitan): pairs read as complex numbers and back; the product
    # with the unit-modulus rotation between them keeps scale, as real RoPE's does
    "view_as_complex", "view_as_real",
)
_SUB = ops("sub.Tensor")
# The arithmetic inside a hand-written norm's statistic: x^2, mean, + eps, rsqrt.
_NORM_INTERNAL = TRANSPARENT | ADDS | MULS | DIVS | _SUB | ops(
    "pow.Tensor_Scalar", "square", "mean.dim", "var.correction", "var.dim", "rsqrt", "sqrt"
)


def _pattern_parts(gm: fx.GraphModule) -> set[str]:
    """Nodes inside recognised patterns (norm internals, attention logits)."""
    parts: set[str] = set()
    for node in gm.graph.nodes:
        att = meta.get(node, meta.ATTENTION)
        if att:
            parts.update(v for k, v in att.items() if k in ("qk", "av", "scale", "dropout") and v)
        if meta.get(node, meta.RULE) == rules.NORM_OP and node.target not in NORM_OPS:
            # A hand-written norm's arithmetic; its input is not part of it (an add
            # inside is on the reduced statistic, ``mean + eps``: a full-size add is
            # what the norm reads).
            frontier = list(node.all_input_nodes)
            for _ in range(12):
                if not frontier:
                    break
                n = frontier.pop()
                if n.target in ADDS and n.meta["val"].shape == node.meta["val"].shape:
                    continue
                if n.target in _NORM_INTERNAL and not meta.get(n, meta.RULE):
                    parts.add(n.name)
                    frontier.extend(n.all_input_nodes)
    return parts


def _is_gain(value: fx.Node, roles: dict) -> bool:
    """A norm-role parameter (or ``1 + w`` of one): a gain, 1 at init (§2)."""
    if value.target in ADDS and any(isinstance(x, (int, float)) for x in value.args):
        value = next(x for x in value.args if isinstance(x, fx.Node))
    return getattr(roles.get(param_of(value)), "role", None) == rules.NORM


def find_uncovered(gm: fx.GraphModule) -> PassResult:
    """List activation-path ops with no rule; see the module docstring."""
    active = param_dependent(gm)
    parts = _pattern_parts(gm)
    roles = meta.graph_meta(gm).get(meta.ROLES, {})
    out: list[tuple[str, str, str]] = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node not in active or not is_tensor(node):
            continue
        if not node.meta["val"].is_floating_point():
            continue  # comparisons, argmax, masks: no scale to keep
        if meta.get(node, meta.RULE) or meta.get(node, meta.NORM) or node.name in parts:
            continue
        if meta.get(node, meta.WEIGHT_NORM):
            continue  # a weight computed from parameters (rules.md "Weight norm")
        if node.target in _PASS_THROUGH or node.target.__name__ == "getitem":
            continue
        if node.target in (MULS | ADDS | DIVS | _SUB):
            # Products / sums where one side is a constant or a buffer (RoPE, masks).
            operands = [a for a in node.args if isinstance(a, fx.Node)]
            if node.target in MULS and any(_is_gain(a, roles) for a in operands):
                continue  # a per-channel gain (LayerScale): a norm parameter, 1 at init (§2)
            if len([a for a in operands if a in active]) <= 1:
                continue
            if node.target in ADDS and meta.get(node, meta.KEEPS_SCALE):
                continue  # RoPE's rotation, LoRA's low-rank update (passes.residuals)
        out.append((node.name, op_name(node), where(node)))
    meta.graph_meta(gm)[meta.UNCOVERED] = out
    return PassResult(gm, False)
