"""Rewrite the parameter-free ops (§3): SiLU, GELU, gated units, dropout, matmul, loss.

Each becomes its ``umup_fx.runtime.ops`` counterpart with the multipliers of the plan's
``HParams``: SiLU / GELU (also a hand-written tanh-GELU) take ``alpha_ffn_act``, a gated unit ``up * silu(gate)`` becomes
one ``ops.silu_glu`` (the SiLU node is absorbed), dropout reads the graph's training
flag, a matmul of two activations gets ``K^-1/2``, and ``cross_entropy`` takes
``alpha_loss_softmax`` and the logit-gradient scale ``V/sqrt(V-1)`` (a mean's also times
its rows at the example inputs, the reference rows). Logits that leave the graph with
no loss consuming them get that same constant on their readout's backward, so a mean
``F.cross_entropy`` outside the model trains as the in-graph loss would.

Reads: ``umup.rule``, ``umup.gate``, ``umup.weight``, ``umup.moe``; ``val`` shapes; graph
key ``plan`` (hparams, parameter roles).
Writes: swaps the nodes' targets; erases the SiLU absorbed by each gated unit.
Fails when: never. A cross-entropy with class weights is kept unscaled and listed.
"""

from __future__ import annotations

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from umup_fx import meta, rules
from umup_fx.runtime import ops

from ._graph import DIVS
from ._graph import ops as aten_ops
from ._rewrite import (
    ancestors,
    arg,
    example_numel,
    example_rows,
    example_size,
    nodes_with_rule,
    shape_of,
    swap,
    training_flag,
    wrap_output,
)
from .scale_weights import _use_role

_SILU = aten_ops("silu")

_REDUCTIONS = {0: "none", 1: "mean", 2: "sum"}


def scale_activations(gm: fx.GraphModule) -> PassResult:
    """SiLU, GELU and gated units."""
    mult = meta.graph_meta(gm)[meta.PLAN].hparams.ffn_act_mult
    by_name = {n.name: n for n in gm.graph.nodes}
    nodes = nodes_with_rule(gm, rules.SILU, rules.GELU, rules.ACTIVATION, rules.GATED)
    for node in nodes:
        rule = meta.get(node, meta.RULE)
        if rule == rules.SILU:
            swap(node, ops.silu, (node.args[0],), {"mult": mult})
        elif rule == rules.GELU:
            approximate = "tanh" if meta.get(node, meta.GELU_INPUT) else arg(node, "approximate", "none")
            swap(node, ops.gelu, (_input_of(node, by_name),), {"mult": mult, "approximate": approximate})
        elif rule == rules.ACTIVATION:
            kind, kwargs = meta.get(node, meta.ACTIVATION)
            swap(node, ops.activation, (_input_of(node, by_name), kind), {"mult": mult, **kwargs})
        else:
            act = by_name[meta.get(node, meta.GATE)]
            up = next(a for a in node.args[:2] if a is not act)
            gate = _input_of(act, by_name)
            if act.target in _SILU:  # the reference library's gated-SiLU rule
                swap(node, ops.silu_glu, (up, gate), {"mult": mult})
            else:
                kind, kwargs = _act_kind(act)
                swap(node, ops.glu, (up, gate, kind), {"mult": mult, **kwargs})
            gm.graph.erase_node(act)
    _erase_dead(gm, rules.PATTERN_PART)  # inner ops of hand-written activations
    return PassResult(gm, bool(nodes))


def _input_of(act: fx.Node, by_name: dict[str, fx.Node]) -> fx.Node:
    """An activation's input: its argument, or a hand-written pattern's input."""
    name = meta.get(act, meta.GELU_INPUT)
    return by_name[name] if name else act.args[0]


def _act_kind(act: fx.Node) -> tuple[str, dict]:
    """``ops.glu``'s (kind, kwargs) for the activation node a gated unit absorbs."""
    if meta.get(act, meta.ACTIVATION):
        return meta.get(act, meta.ACTIVATION)
    if meta.get(act, meta.GELU_INPUT):  # hand-written tanh-GELU
        return "gelu", {"approximate": "tanh"}
    return "gelu", {"approximate": arg(act, "approximate", "none")}


def _erase_dead(gm: fx.GraphModule, rule: str) -> None:
    """Erase nodes of ``rule`` left without users (latest first, so chains go)."""
    for node in reversed(list(gm.graph.nodes)):
        if meta.get(node, meta.RULE) == rule and not node.users:
            gm.graph.erase_node(node)


def scale_dropout(gm: fx.GraphModule) -> PassResult:
    """Dropout: x sqrt(1-p) forward and backward, on only while ``module.training``."""
    nodes = nodes_with_rule(gm, rules.DROPOUT)
    for node in nodes:
        flag = training_flag(gm, arg(node, "train", True))
        swap(node, ops.dropout, (node.args[0], float(arg(node, "p", 0.5)), flag))
    return PassResult(gm, bool(nodes))


def scale_pooling(gm: fx.GraphModule) -> PassResult:
    """Pooling (rules §3): averages and means over activation axes keep the value, their
    input grad x sqrt(n); max pooling keeps the value, its input grad x sqrt(stride)."""
    nodes = nodes_with_rule(gm, rules.POOL)
    for node in nodes:
        name = node.target._opname  # avg_pool2d, adaptive_avg_pool2d, mean
        if name.startswith("max_pool"):
            names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")
            swap(node, ops.max_pool, (node.args[0], name, *(arg(node, k) for k in names)))
            continue
        if name == "mean":
            args = (node.args[1], bool(arg(node, "keepdim", False)))
        elif name.startswith("adaptive"):
            args = (node.args[1],)
        else:  # avg_pool: kernel, stride, padding, ceil_mode, count_include_pad
            names = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")
            args = tuple(arg(node, k) for k in names)
            args = args[:1] + (args[1] or None,) + args[2:]
        swap(node, ops.mean_over, (node.args[0], name, *args))
    return PassResult(gm, bool(nodes))


def scale_picks(gm: fx.GraphModule) -> PassResult:
    """A head's pick of one sequence position: x grad * sqrt(n)."""
    nodes = nodes_with_rule(gm, rules.PICK)
    for node in nodes:
        x, dim = node.args[:2]
        shape = shape_of(x)
        n = example_size(shape[dim]) if shape else None  # the reference length
        swap(node, ops.pick, (*node.args[:3], n))
    return PassResult(gm, bool(nodes))


def scale_matmuls(gm: fx.GraphModule) -> PassResult:
    """Matmuls of two activations: output x K^-1/2, gradients tied."""
    nodes = nodes_with_rule(gm, rules.MATMUL)
    for node in nodes:
        swap(node, ops.matmul, tuple(node.args[:2]))
    return PassResult(gm, bool(nodes))


def scale_cross_entropy(gm: fx.GraphModule) -> PassResult:
    """Cross-entropy: logits x alpha_loss_softmax, logit grads x V/sqrt(V-1); binary
    cross-entropy with logits as its two-class case (logit grads x 2)."""
    g = meta.graph_meta(gm)
    mult = g[meta.PLAN].hparams.loss_softmax_mult
    changed = False
    for node in nodes_with_rule(gm, rules.CROSS_ENTROPY):
        if arg(node, "weight") is not None:
            g[meta.UNCOVERED].append((node.name, "cross_entropy with class weights", "unscaled"))
            continue
        swap(
            node,
            ops.cross_entropy,
            tuple(node.args[:2]),
            {
                "mult": mult,
                "reduction": _REDUCTIONS[int(arg(node, "reduction", 1))],
                "ignore_index": int(arg(node, "ignore_index", -100)),
                "label_smoothing": float(arg(node, "label_smoothing", 0.0)),
                "reference_rows": example_rows(node.args[0]),
                "divided": _divided_later(node),
            },
        )
        changed = True
    for node in nodes_with_rule(gm, rules.BCE_LOGITS):
        if arg(node, "weight") is not None or arg(node, "pos_weight") is not None:
            g[meta.UNCOVERED].append((node.name, "BCE with (pos_)weight", "unscaled"))
            continue
        swap(node, ops.binary_cross_entropy_with_logits, tuple(node.args[:2]), {
            "reduction": _REDUCTIONS[int(arg(node, "reduction", 1))],
            "reference_rows": example_numel(node.args[0]),
        })
        changed = True
    return PassResult(gm, changed)


def _divided_later(loss: fx.Node) -> bool:
    """A loss whose one use divides it (HF's ``sum / num_items_in_batch``): a mean."""
    users = list(loss.users)
    return (len(users) == 1 and users[0].target in DIVS and users[0].args[0] is loss)


def scale_readout_outputs(gm: fx.GraphModule) -> PassResult:
    """Readouts whose output leaves the graph and reaches no in-graph loss (the loss is
    computed outside the model): backward-only ``* B_ref V/sqrt(V-1)`` on their output,
    ``B_ref`` its rows at the example inputs, ``V`` its last axis. That is the constant
    ``ops.cross_entropy`` gives the logit gradient beyond a standard mean, so a
    mean-reduced ``F.cross_entropy`` (or ``umup_fx.cross_entropy``) on the returned
    logits gives the gradients of the same loss inside the graph (rules §3).

    Reads: ``umup.rule`` ("linear", "cross_entropy"), ``umup.weight``, ``umup.moe``;
    graph key ``plan``. Writes: inserts one ``ops.scale_bwd`` after each such readout.
    Fails when: never (a readout whose rows are unknown at the example is left as is).
    """
    plan = meta.graph_meta(gm)[meta.PLAN]
    output = next(n for n in gm.graph.nodes if n.op == "output")
    consumed: set[fx.Node] = set()
    for loss in nodes_with_rule(gm, rules.CROSS_ENTROPY, rules.BCE_LOGITS):
        consumed |= ancestors(loss)
    returned = ancestors(output)
    changed = False
    for node in nodes_with_rule(gm, rules.LINEAR):
        if (meta.get(node, meta.MOE) or node not in returned or node in consumed
                or _use_role(plan, meta.get(node, meta.WEIGHT), node) != rules.OUTPUT):
            continue
        rows, shape = example_rows(node), shape_of(node)
        vocab = example_size(shape[-1]) if shape else None
        if rows is None or vocab is None:
            continue
        wrap_output(gm, node, ops.scale_bwd, rows * ops.loss_grad_scale(vocab))
        changed = True
    return PassResult(gm, changed)
