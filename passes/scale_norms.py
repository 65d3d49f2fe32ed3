"""Rewrite normalisations (§2, §3): non-parametric by default, else scaled gain grads.

u-muP's prerequisite is non-parametric norms: by default each gain multiply is removed
(gain frozen at 1) and a norm op's weight / bias arguments are dropped; ``transform``
freezes those parameters, so state_dicts keep their keys. With
``Options.trainable_norms`` the gains stay and their gradients get ``(d / numel)^1/2``.

Reads: ``umup.rule`` ("norm", "norm_gain"), ``umup.weight``; graph key ``options``.
Writes: removes "norm_gain" nodes (or scales their parameter's gradient); swaps
``layer_norm`` / ``rms_norm`` for the ``umup_fx.ops`` versions.
Fails when: never.
"""

from __future__ import annotations

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from umup_fx import meta, ops, rules

from ._graph import ops as aten_ops
from ._graph import param_name, source
from ._rewrite import arg, insert_call, nodes_with_rule, swap

_LAYER_NORM = aten_ops("layer_norm")
_RMS_NORM = aten_ops("rms_norm")


def _split_gain(node: fx.Node) -> tuple[fx.Node, fx.Node]:
    """(normalised value, gain or bias operand) of a ``norm_gain`` mul / add."""
    a, b = node.args[:2]
    return (b, a) if param_name(source(a)) else (a, b)


def scale_norms(gm: fx.GraphModule) -> PassResult:
    """Make norms non-parametric (default) or scale their parameters' gradients."""
    trainable = meta.graph_meta(gm)[meta.OPTIONS].trainable_norms
    changed = False
    for node in nodes_with_rule(gm, rules.NORM_GAIN):
        x, gain = _split_gain(node)
        if trainable:
            scaled = insert_call(gm, node, ops.param_grad_scale, (gain, x), like=gain)
            node.replace_input_with(gain, scaled)
        else:
            node.replace_all_uses_with(x)
            meta.graph_meta(gm).setdefault(meta.REPLACED, {})[node.name] = x.name
            gm.graph.erase_node(node)
        changed = True
    for node in nodes_with_rule(gm, rules.NORM_OP):
        x, shape = node.args[:2]
        weight = arg(node, "weight")
        if node.target in _LAYER_NORM:
            bias, eps = arg(node, "bias"), arg(node, "eps", 1e-5)
            if trainable:
                swap(node, ops.layer_norm, (x, shape, weight, bias, eps))
            else:
                swap(node, ops.layer_norm, (x, shape, None, None, eps))
        elif node.target in _RMS_NORM:
            eps = arg(node, "eps")
            swap(node, ops.rms_norm, (x, shape, weight if trainable else None, eps))
        else:
            continue  # hand-written norm core: parameter-free already
        changed = True
    return PassResult(gm, changed)
