"""Rewrite normalisations (§2, §3): non-parametric by default, else scaled gain grads.

u-muP's prerequisite is non-parametric norms: by default each gain multiply is removed
(gain frozen at 1) and a norm op's weight / bias arguments are dropped; ``transform``
freezes those parameters, so state_dicts keep their keys. With
``Options.trainable_norms`` the gains stay and their gradients get ``(d / numel)^1/2``,
numel at the example inputs (the reference size, rules §3).

Reads: ``umup.rule`` ("norm", "norm_gain"), ``umup.weight``; graph key ``options``.
Writes: removes "norm_gain" nodes (or scales their parameter's gradient); swaps
``layer_norm`` / ``rms_norm`` for the ``umup_fx.runtime.ops`` versions.
Fails when: never.
"""

from __future__ import annotations

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from umup_fx import meta, rules
from umup_fx.runtime import ops

from ._graph import ops as aten_ops
from ._graph import source
from ._rewrite import arg, example_numel, insert_call, nodes_with_rule, swap, training_flag

_LAYER_NORM = aten_ops("layer_norm")
_RMS_NORM = aten_ops("rms_norm")
_BATCH_NORM = aten_ops("batch_norm")
_GROUP_NORM = aten_ops("group_norm")


def _split_gain(node: fx.Node) -> tuple[fx.Node, fx.Node]:
    """(normalised value, gain or bias operand) of a ``norm_gain`` mul / add."""
    a, b = node.args[:2]
    return (a, b) if meta.get(source(a), meta.NORM) else (b, a)


def _erase_unused(gm: fx.GraphModule, node: fx.Node) -> None:
    """Erase ``node`` and its producers once nothing reads them (a gain's ``1 + w``)."""
    while node.op == "call_function" and not node.users:
        inputs = node.all_input_nodes
        gm.graph.erase_node(node)
        if len(inputs) != 1:
            return
        node = inputs[0]


def scale_norms(gm: fx.GraphModule) -> PassResult:
    """Make norms non-parametric (default) or scale their parameters' gradients."""
    trainable = meta.graph_meta(gm)[meta.OPTIONS].trainable_norms
    changed = False
    for node in nodes_with_rule(gm, rules.NORM_GAIN):
        x, gain = _split_gain(node)
        if trainable:
            scaled = insert_call(gm, node, ops.param_grad_scale, (gain, x, example_numel(x)),
                                 like=gain)
            node.replace_input_with(gain, scaled)
        else:
            node.replace_all_uses_with(x)
            meta.graph_meta(gm).setdefault(meta.REPLACED, {})[node.name] = x.name
            gm.graph.erase_node(node)
            if isinstance(gain, fx.Node):
                _erase_unused(gm, gain)
        changed = True
    for node in nodes_with_rule(gm, rules.NORM_OP):
        x, shape = node.args[:2]  # (group_norm: num_groups; batch_norm: see below)
        weight = arg(node, "weight")
        numel = {"numel": example_numel(x)} if trainable else {}  # the reference size
        if node.target in _LAYER_NORM:
            bias, eps = arg(node, "bias"), arg(node, "eps", 1e-5)
            if trainable:
                swap(node, ops.layer_norm, (x, shape, weight, bias, eps), numel)
            else:
                swap(node, ops.layer_norm, (x, shape, None, None, eps))
        elif node.target in _RMS_NORM:
            eps = arg(node, "eps")
            swap(node, ops.rms_norm, (x, shape, weight if trainable else None, eps), numel)
        elif node.target in _GROUP_NORM:
            weight, bias = (arg(node, "weight"), arg(node, "bias")) if trainable else (None, None)
            swap(node, ops.group_norm, (x, shape, weight, bias, arg(node, "eps", 1e-5)), numel)
        elif node.target in _BATCH_NORM:
            weight, bias = (node.args[1], node.args[2]) if trainable else (None, None)
            flag = training_flag(gm, node.args[5])  # running stats in eval, as the module
            swap(node, ops.batch_norm, (node.args[0], weight, bias, *node.args[3:5], flag,
                                        *node.args[6:8]), numel)
        else:
            continue  # hand-written norm core: parameter-free already
        changed = True
    return PassResult(gm, changed)
