"""Weight norm (rules.md "Weight norm"): a weight computed as ``g * v / ||v||``.

``torch.nn.utils.parametrizations.weight_norm`` and the older
``torch.nn.utils.weight_norm`` both capture as ``aten._weight_norm(v, g, dim)``, the norm
taken over every axis of ``v`` but ``dim`` (Wav2Vec2's positional conv: ``dim=2``, one
norm per kernel tap). The weight op reads the result, not a parameter. u-muP's reading:
``v`` is the weight (role, fans, unit init and LR from the op that reads the result, as
if ``v`` were its weight), and ``g`` is a gain, 1 at its unit value and non-parametric
by default (§2), with the result made unit scale (``sqrt(n)`` for a norm over ``n``
elements, ``runtime/ops/normalization.py`` ``weight_norm``).

``find_weight_norms`` (analysis, before ``passes.match``): reads ``umup.param``; writes
``umup.weight_norm`` = {"v", "g", "n"} on every ``_weight_norm`` of two parameters, which
``passes._graph.param_of`` then reads as ``v`` (so the conv / linear is matched with
``v`` as its weight, and ``passes.roles`` gives ``v`` that use and ``g`` the role
``norm``). A ``_weight_norm`` of anything else is left alone (listed as uncovered).
Fails when: never.

``scale_weight_norms`` (rewrite): swaps each marked node for ``ops.weight_norm``, without
``g`` unless ``trainable_norms`` (as ``passes.scale_norms`` drops a norm's gain).
Reads ``umup.weight_norm``, graph key ``options``; fails when: never.
"""

from __future__ import annotations

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from umup_fx import meta
from umup_fx.runtime import ops

from ._graph import ops as aten_ops
from ._graph import param_name, source
from ._rewrite import arg, swap

WEIGHT_NORMS = aten_ops("_weight_norm")


def find_weight_norms(gm: fx.GraphModule) -> PassResult:
    """Mark ``_weight_norm(v, g, dim)`` of two parameters; see the module docstring."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in WEIGHT_NORMS:
            continue
        v, g = (source(a) for a in node.args[:2])
        if param_name(v) and param_name(g):
            n = v.meta["val"].numel() // max(g.meta["val"].numel(), 1)
            meta.node_meta(node)[meta.WEIGHT_NORM] = {"v": param_name(v), "g": param_name(g),
                                                      "n": int(n)}
    return PassResult(gm, False)


def scale_weight_norms(gm: fx.GraphModule) -> PassResult:
    """Swap every marked ``_weight_norm`` for ``ops.weight_norm``: the result at unit
    scale; the gain out of the graph (non-parametric, §2) unless ``trainable_norms``,
    then its gradient ``x n^-1/2``."""
    trainable = meta.graph_meta(gm)[meta.OPTIONS].trainable_norms
    changed = False
    for node in gm.graph.nodes:
        found = meta.get(node, meta.WEIGHT_NORM) if node.op == "call_function" else None
        if found:
            g = node.args[1] if trainable else None
            swap(node, ops.weight_norm, (node.args[0], g, arg(node, "dim", 0)), {"n": found["n"]})
            changed = True
    return PassResult(gm, changed)
