"""The μP baseline's forward changes (``parametrization="mup"``; docs/rules.md, Baselines).

Relative to the base model: a readout's output times ``base_fan_in / fan_in`` (μP's
output multiplier), and attention logits ``√d_base / d_head`` instead of the model's
``1/√d_head`` (μP's ``1/d``, unchanged at the base width). Nothing else: μP keeps the
model's ops; its width dependence is in the init and the LR (``umup_fx.parametrizations``).

Reads: ``umup.rule``, ``umup.weight``, ``umup.attention``; graph keys ``plan``, ``options``
(``options.base``: the base model's fans and head sizes, in graph order).
Writes: a multiply after each readout (``umup.multiplier``); SDPA's ``scale``; a hand-written attention's
logit constant.
Fails when: the base model's graph has a different number of attention ops
(``AnalysisError``: the base is not the same architecture).
"""

from __future__ import annotations

import math

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from umup_fx import meta, rules
from umup_fx.errors import AnalysisError

from ._rewrite import arg, nodes_with_rule, wrap_output


def mup_readouts(gm: fx.GraphModule) -> PassResult:
    """Readout linears: output x base_fan_in / fan_in."""
    g = meta.graph_meta(gm)
    plan, base = g[meta.PLAN], g[meta.OPTIONS].base
    changed = False
    for node in nodes_with_rule(gm, rules.LINEAR):
        weight = plan.params[meta.get(node, meta.WEIGHT)]
        uses = [u.role for u in weight.uses if u.node == node.name] or [weight.role]
        if uses[0] != rules.OUTPUT:
            continue
        # A tied embedding read out: its readout fan_in is the embedding's fan_out.
        tied = weight.role != rules.OUTPUT
        fan = weight.fan_out_value if tied else weight.fan_in_value
        base_fan = base.fans.get(weight.name, (None, None))[1 if tied else 0]
        if fan and base_fan and base_fan != fan:
            product = wrap_output(gm, node, torch.mul, base_fan / fan)
            meta.node_meta(product)[meta.MULTIPLIER] = node.name  # the readout's output now
            changed = True
    return PassResult(gm, changed)


def mup_attention(gm: fx.GraphModule) -> PassResult:
    """Attention logits √d_base / d_head (μP's 1/d, the model's own at the base width)."""

    base = meta.graph_meta(gm)[meta.OPTIONS].base
    sizes = attention_head_sizes(gm)
    if len(sizes) != len(base.head_sizes):
        raise AnalysisError(
            f"the base model has {len(base.head_sizes)} attention ops and this one "
            f"{len(sizes)}: base= must be the same architecture at another width."
        )
    attention = [n for n in gm.graph.nodes
                 if meta.get(n, meta.RULE) in (rules.SDPA, rules.ATTENTION)]
    by_name = {n.name: n for n in gm.graph.nodes}
    for node, d, d_base in zip(attention, sizes, base.head_sizes, strict=True):
        if d == d_base:
            continue
        factor = math.sqrt(d_base / d)  # c / sqrt(d) -> c * sqrt(d_base) / d
        if meta.get(node, meta.RULE) == rules.SDPA:
            scale = arg(node, "scale") or d**-0.5
            node.kwargs = {**node.kwargs, "scale": scale * factor}
        else:
            name = meta.get(node, meta.ATTENTION)["scale"]
            if name is None:
                raise AnalysisError("a hand-written attention without a logit constant: "
                                    "mup cannot rescale it.")
            c = by_name[name]
            value = next(a for a in c.args if isinstance(a, (int, float)))
            new = value * factor if c.target is torch.ops.aten.mul.Tensor else value / factor
            c.args = tuple(new if a is value else a for a in c.args)
    return PassResult(gm, bool(attention))


def attention_head_sizes(gm: fx.GraphModule) -> list[int]:
    """v's head size of every SDPA / hand-written attention, in graph order."""
    out = []
    for node in gm.graph.nodes:
        rule = meta.get(node, meta.RULE)
        if rule == rules.SDPA:
            out.append(int(node.args[2].meta["val"].shape[-1]))
        elif rule == rules.ATTENTION:
            av = next(n for n in gm.graph.nodes if n.name == meta.get(node, meta.ATTENTION)["av"])
            out.append(int(av.args[1].meta["val"].shape[-1]))
    return out
