"""Rewrite normalisations (§2, §3): non-parametric by default, else scaled gain grads.

u-muP's prerequisite is non-parametric norms: by default each gain multiply is removed
(gain frozen at 1) and a norm op's weight / bias arguments are dropped; ``transform``
freezes those parameters, so state_dicts keep their keys. With
``Options.trainable_norms`` the gains stay and their gradients get ``(d / numel)^1/2``,
numel at the example inputs (the reference size, rules §3).

Pretrained import (``Options.pretrained``, transform's graphs only) keeps each norm
exact: the imported model's norm input is the checkpoint's divided by a constant ``c``
(export's factor there, larger block by block), and its eps must be divided by ``c^2``
with it. ``c`` differs per block while blocks share one graph, so each norm reads it
from a non-persistent 0-dim buffer of the module that runs it (``NORM_SCALE_PREFIX`` +
its index there; ``export.import_pretrained`` fills them): a norm op gets
``input_scale=c`` (its kernel and float eps stay), a hand-written one's eps becomes
``ops.norm_eps(eps, c)``. Every other graph is left as it was.

Reads: ``umup.rule`` ("norm", "norm_gain"), ``umup.weight``, ``nn_module_stack``; graph
keys ``options``, ``static_mode``.
Writes: removes "norm_gain" nodes (or scales their parameter's gradient); swaps
``layer_norm`` / ``rms_norm`` for the ``umup_fx.runtime.ops`` versions; on import, a
placeholder per norm marked ``umup.norm_scale`` (its buffer's path).
Fails when: never.
"""

from __future__ import annotations

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from umup_fx import meta, rules
from umup_fx.runtime import ops

from ._graph import module_path, source
from ._graph import ops as aten_ops
from ._rewrite import (
    ancestors,
    arg,
    example_numel,
    insert_call,
    nodes_with_rule,
    swap,
    training_flag,
)

_LAYER_NORM = aten_ops("layer_norm")
_RMS_NORM = aten_ops("rms_norm")
_BATCH_NORM = aten_ops("batch_norm")
_GROUP_NORM = aten_ops("group_norm")
_NORM_FNS = {ops.layer_norm, ops.rms_norm, ops.group_norm, ops.batch_norm}
_ROOTS = aten_ops("rsqrt", "sqrt")
_ADD = aten_ops("add.Tensor", "add.Scalar")

NORM_SCALE_PREFIX = "_umup_norm_scale_"  # buffer name of a norm's input factor (import)


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
    if meta.graph_meta(gm)[meta.OPTIONS].pretrained and not meta.graph_meta(gm).get(meta.STATIC_MODE):
        scale_imported_norms(gm)
        changed = True
    return PassResult(gm, changed)


def eps_add(norm: fx.Node) -> fx.Node | None:
    """The ``stat + eps`` node under the root of a hand-written norm core
    ``x * rsqrt(stat + eps)`` / ``x / sqrt(stat + eps)``, or None."""
    for a in norm.args[:2]:
        r = source(a)
        if isinstance(r, fx.Node) and r.target in _ROOTS:
            add = source(r.args[0])
            if isinstance(add, fx.Node) and add.target in _ADD and len(add.args) == 2:
                return add
    return None


def normalised_input(norm: fx.Node) -> fx.Node | None:
    """The value a norm normalises: a norm op's input, a hand-written core's ``x``."""
    if norm.target in _NORM_FNS:
        return norm.args[0]
    add = eps_add(norm)
    return next((a for a in norm.args[:2] if isinstance(a, fx.Node)
                 and a is not add and add not in ancestors(a)), None)


def scale_imported_norms(gm: fx.GraphModule) -> None:
    """Give every norm a buffer placeholder holding its input factor (module docstring)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    like = next((n.meta["val"] for n in placeholders
                 if isinstance(n.meta.get("val"), torch.Tensor)), torch.empty((), device="meta"))
    count: dict[str, int] = {}
    for node in nodes_with_rule(gm, rules.NORM_OP):
        hand_written = node.target not in _NORM_FNS
        add = eps_add(node) if hand_written else None
        eps = [a for a in add.args if isinstance(a, (int, float))] if add is not None else []
        if node.target is ops.batch_norm or hand_written and len(eps) != 1:
            continue  # running statistics / no eps to rescale
        owner = module_path(node)  # the norm's module ("" the root)
        k = count[owner] = count.get(owner, -1) + 1
        path = f"{owner}.{NORM_SCALE_PREFIX}{k}" if owner else f"{NORM_SCALE_PREFIX}{k}"
        with gm.graph.inserting_after(placeholders[-1]):
            scale = gm.graph.placeholder(f"umup_norm_scale_{len(placeholders)}")
        placeholders.append(scale)
        scale.meta["val"] = like.new_empty((), dtype=torch.float32)
        meta.node_meta(scale)[meta.NORM_SCALE] = path
        if not hand_written:
            node.kwargs = {**node.kwargs, "input_scale": scale}
            continue
        new_eps = insert_call(gm, add, ops.norm_eps, (eps[0], scale), like=scale)
        add.target = torch.ops.aten.add.Tensor  # (add.Scalar takes no tensor)
        add.args = tuple(new_eps if isinstance(a, (int, float)) else a for a in add.args)
