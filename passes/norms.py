"""Find normalisations: the ops, the hand-written RMSNorm pattern, and their gains.

A normalisation is ``layer_norm`` / ``rms_norm``, or the decomposed
``x * rsqrt(mean(x^2) + eps)`` that hand-written RMSNorms (Llama, HF) produce, or a
LayerNorm by hand: ``(x - mean) * rsqrt(var + eps)`` (Cohere) or ``/ sqrt(...)``. Its
output times a 1-D parameter is its gain (and plus a 1-D parameter its bias).

Reads: ``umup.param`` on placeholders.
Writes: ``umup.norm = True`` on every node whose value is a normalisation output
(through transparent ops, the gain and the bias); ``umup.rule = "norm"`` on the
normalising op and ``"norm_gain"`` on the gain multiply.
Fails when: never.
"""

from __future__ import annotations

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from umup_fx import meta, rules

from ._graph import ADDS, MULS, TRANSPARENT, ops, param_name, source

NORM_OPS = ops("layer_norm", "rms_norm", "group_norm", "batch_norm")
_RSQRT = ops("rsqrt")
_SQRT = ops("sqrt")
_DIVS = ops("div.Tensor")
_MEAN = ops("mean.dim", "var.correction", "var.dim")


def _same(a: object, b: object) -> bool:
    """One value, or two nodes computing it alike (``x - mean`` written twice)."""
    a, b = source(a), source(b)
    return a is b or (isinstance(a, fx.Node) and isinstance(b, fx.Node) and a.op == b.op
                      == "call_function" and a.target == b.target and a.args == b.args)


def _is_rms_pattern(node: fx.Node) -> bool:
    """mul(x, rsqrt(...mean(...x...)...)) or div(x, sqrt(...)): a hand-written RMSNorm /
    LayerNorm core (``(x - mean) * rsqrt(var + eps)``, ``(h - mu) / sqrt(h.var() + eps)``)."""
    if node.target in _DIVS and len(node.args) == 2 and isinstance(node.args[1], fx.Node):
        pairs = [(node.args[0], node.args[1], _SQRT)]
    elif node.target in MULS and len(node.args) == 2:
        pairs = [(x, r, _RSQRT) for x, r in (node.args, node.args[::-1])]
    else:
        return False
    for x, r, root in pairs:
        if isinstance(r, fx.Node) and source(r).target in root:
            # The normalised value must be what the statistic was computed from.
            frontier, seen = [source(r)], 0
            inputs = source(x).all_input_nodes if isinstance(source(x), fx.Node) else []
            while frontier and seen < 12:
                n = frontier.pop()
                seen += 1
                if n.target in _MEAN:
                    stat = n.args[0]
                    return _same(stat, x) or any(_same(a, x) for a in stat.all_input_nodes) \
                        or any(_same(stat, a) for a in inputs)
                frontier.extend(a for a in n.all_input_nodes if a.op == "call_function")
    return False


def _is_norm(node: object) -> bool:
    return isinstance(node, fx.Node) and bool(meta.get(source(node), meta.NORM))


def find_norms(gm: fx.GraphModule) -> PassResult:
    """Mark normalisation outputs; see the module docstring."""
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        m = meta.node_meta(node)
        if node.target in NORM_OPS or _is_rms_pattern(node):
            m[meta.NORM] = True
            m[meta.RULE] = rules.NORM_OP
        elif node.target in TRANSPARENT and _is_norm(node.args[0]):
            m[meta.NORM] = True
        elif node.target in MULS and len(node.args) == 2 or node.target in ADDS and len(node.args) == 2:
            a, b = node.args
            for x, g in ((a, b), (b, a)):
                name = _gain_param(g, offset_ok=node.target in MULS)
                if _is_norm(x) and name:
                    m[meta.NORM] = True
                    m[meta.RULE] = rules.NORM_GAIN
                    m[meta.WEIGHT] = name
    return PassResult(gm, False)


def _gain_param(g: object, offset_ok: bool) -> str | None:
    """The 1-D parameter a gain operand is: ``w``, or ``1 + w`` (Gemma, with ``w`` at 0
    meaning a gain of 1; the offset is a Python number), through casts."""
    g = source(g)
    if not isinstance(g, fx.Node):
        return None
    if offset_ok and g.target in ADDS and len(g.args) == 2:
        numbers = [a for a in g.args if isinstance(a, (int, float))]
        tensors = [a for a in g.args if isinstance(a, fx.Node)]
        if len(numbers) == 1 and len(tensors) == 1:
            g = source(tensors[0])
    name = param_name(g)
    return name if name and g.meta["val"].dim() == 1 else None
