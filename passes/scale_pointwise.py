"""Rewrite the parameter-free ops (§3): SiLU, GELU, gated units, dropout, matmul, loss.

Each becomes its ``umup_fx.ops`` counterpart with the multipliers of the plan's
``HParams``: SiLU / GELU (also a hand-written tanh-GELU) take ``alpha_ffn_act``, a gated unit ``up * silu(gate)`` becomes
one ``ops.silu_glu`` (the SiLU node is absorbed), dropout reads the graph's training
flag, a matmul of two activations gets ``K^-1/2``, and ``cross_entropy`` takes
``alpha_loss_softmax``, the ``V/sqrt(V-1)`` logit-gradient scale and a forward-only mean.

Reads: ``umup.rule``, ``umup.gate``; graph key ``plan`` (hparams).
Writes: swaps the nodes' targets; erases the SiLU absorbed by each gated unit.
Fails when: never. A cross-entropy with class weights is kept unscaled and listed.
"""

from __future__ import annotations

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from umup_fx import meta, ops, rules

from ._rewrite import arg, nodes_with_rule, swap, training_flag

_REDUCTIONS = {0: "none", 1: "mean", 2: "sum"}


def scale_activations(gm: fx.GraphModule) -> PassResult:
    """SiLU, GELU and gated units."""
    mult = meta.graph_meta(gm)[meta.PLAN].hparams.ffn_act_mult
    by_name = {n.name: n for n in gm.graph.nodes}
    nodes = nodes_with_rule(gm, rules.SILU, rules.GELU, rules.GATED)
    for node in nodes:
        rule = meta.get(node, meta.RULE)
        if rule == rules.SILU:
            swap(node, ops.silu, (node.args[0],), {"mult": mult})
        elif rule == rules.GELU and meta.get(node, meta.GELU_INPUT):
            # A hand-written tanh-GELU: one op replaces the pattern, its parts go.
            x = by_name[meta.get(node, meta.GELU_INPUT)]
            swap(node, ops.gelu, (x,), {"mult": mult, "approximate": "tanh"})
            _erase_dead(gm, rules.PATTERN_PART)
        elif rule == rules.GELU:
            approximate = arg(node, "approximate", "none")
            swap(node, ops.gelu, (node.args[0],), {"mult": mult, "approximate": approximate})
        else:
            act = by_name[meta.get(node, meta.GATE)]
            up = next(a for a in node.args[:2] if a is not act)
            swap(node, ops.silu_glu, (up, act.args[0]), {"mult": mult})
            gm.graph.erase_node(act)
    return PassResult(gm, bool(nodes))


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


def scale_matmuls(gm: fx.GraphModule) -> PassResult:
    """Matmuls of two activations: output x K^-1/2, gradients tied."""
    nodes = nodes_with_rule(gm, rules.MATMUL)
    for node in nodes:
        swap(node, ops.matmul, tuple(node.args[:2]))
    return PassResult(gm, bool(nodes))


def scale_cross_entropy(gm: fx.GraphModule) -> PassResult:
    """Cross-entropy: logits x alpha_loss_softmax, logit grads x V/sqrt(V-1)."""
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
            },
        )
        changed = True
    return PassResult(gm, changed)
