"""FP8 eligibility (§7): non-critical matmuls are hidden linears fed by a norm.

QKV (fused or not) and FFN up / gate projections read a normalised input, so their
input scale is pinned at 1 for the whole run: safe with a static FP8 scale of 1. MoE
experts' up / gate projections read the normalised tokens gathered (rows picked, each
row unchanged) into expert order, so they are eligible too.
The attention output projection, FFN down projection, embedding and readout are
critical and stay in the model's precision.

Reads: ``umup.rule``, ``umup.weight``, ``umup.norm``; graph key ``roles``.
Writes: ``umup.fp8`` (bool) on every ``linear``-rule node.
Fails when: never.
"""

from __future__ import annotations

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from umup_fx import meta, rules

from ._graph import ops, source

_ADDMM = ops("addmm")
_GATHER = ops("index.Tensor", "index_select")


def _ungathered(x: fx.Node) -> fx.Node:
    """The value whose rows ``x`` picks (tokens sorted / repeated for the experts)."""
    x = source(x)
    while isinstance(x, fx.Node) and x.target in _GATHER:
        x = source(x.args[0])
    return x


def mark_fp8(gm: fx.GraphModule) -> PassResult:
    """Mark FP8-eligible linears; see the module docstring."""
    roles = meta.graph_meta(gm)[meta.ROLES]
    for node in gm.graph.nodes:
        if meta.get(node, meta.RULE) != rules.LINEAR or meta.get(node, meta.EINSUM):
            continue  # (an einsum weight stays in the model's precision)
        weight = meta.get(node, meta.WEIGHT)
        x = node.args[1] if node.target in _ADDMM else node.args[0]  # addmm(bias, x, W)
        if meta.get(node, meta.GROUPED):
            x = _ungathered(x)
        from_norm = bool(meta.get(source(x), meta.NORM)) or bool(meta.get(x, meta.NORM))
        meta.node_meta(node)[meta.FP8] = roles[weight].role == rules.HIDDEN and from_norm
    return PassResult(gm, False)
