"""Mixture-of-experts routing (rules §10): routers, their gates, and the gated combine.

A *router* is a linear whose logits go through softmax or sigmoid into ``topk`` (a
routed MoE: Mixtral, OLMoE, Qwen2-MoE, hand-written), into a ``gather`` by indices
chosen elsewhere (DeepSeek-V3 picks on biased scores), or, with a single output,
straight into a product (Qwen2-MoE's shared-expert gate). Its probabilities are
weights of a sum, not activations: they keep the model's own values (no softmax or
activation scale), and the router linear is a readout (its experts axis is fixed, so
``passes.roles`` already calls it "output") with multiplier 1, not alpha_out.

The gates are followed from ``topk``'s values through renormalisation (``v / v.sum``),
constant factors, casts, gathers and views to the product with the experts' outputs:
the *combine*. At init u-muP's router logits are O(fan_in^-1/2), so every gate is
g0 = p0 / (renormalised ? sum of k p0 : 1) * factor with p0 = 1/E (softmax) or 1/2
(sigmoid); the k weighted experts then sum to RMS g0 sqrt(k), and the combine is
scaled by 1 / (g0 sqrt(k)) forward and backward (tied, as a residual add's weights).
The top-k sum after the combine and the renormalising sum are parts of the pattern.

Reads: ``umup.rule``, ``umup.weight``, ``umup.dims``; graph keys ``roles``, ``solver``.
Writes: ``umup.moe`` on each combine ({"scale", "k", "experts", "gate_at_init",
"normalized", "router", "sum"}) and ``{"router": name}`` on the router's linear and
probability op; rule "moe_combine" on the combine, "router" on the probability op,
"pattern_part" on the renormalisation and the top-k sum; the router's link also gets
"grad_at_init", the RMS its logits' gradient has at init (what ``umup_fx.check``
expects of the router, rules §8 / §10).
Fails when: never; a router whose gates cannot be followed to a product is noted in
the report and left as the model wrote it.
"""

from __future__ import annotations

import math
import operator
from typing import Any

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from umup_fx import meta, rules
from umup_fx.runtime import ops as ops_

from ._graph import (
    ADDS,
    MULS,
    SOFTMAXES,
    TRANSPARENT,
    consumers,
    ops,
    param_dependent,
    source,
    where,
)
from ._rewrite import nodes_with_rule, swap

_TOPK = ops("topk")
_SIGMOID = ops("sigmoid")
_SUM = ops("sum.dim_IntList")
_DIV = ops("div.Tensor", "div_.Tensor")
_GATHER = ops("index.Tensor", "index_select", "gather")
_EINSUM = ops("einsum")
_GATHER_DIM = ops("gather")
_SCATTER = ops("scatter.src", "scatter.value", "scatter_")  # gates placed in a zero [.., E]
_ACCUMULATE = ops("index_add", "index_add_", "scatter_add", "scatter_add_", "index_put", "index_put_")
_MUL = MULS | ops("mul_.Tensor")


def _router_linear(probs: fx.Node) -> fx.Node | None:
    logits = source(probs.args[0])
    return logits if meta.get(logits, meta.RULE) == rules.LINEAR else None


def _top_logits(probs: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``softmax(topk(logits).values)`` (Mistral's reference MoE: pick on the logits, then
    a softmax over the k picked): (the router linear, the topk). The same gates as a
    softmax renormalised over the top k."""
    values = source(probs.args[0])
    if not (values.target is operator.getitem and values.args[1] == 0
            and values.args[0].target in _TOPK and probs.target in SOFTMAXES):
        return None
    topk = values.args[0]
    logits = source(topk.args[0])
    return (logits, topk) if meta.get(logits, meta.RULE) == rules.LINEAR else None


def _renormaliser(values: fx.Node, users: list[fx.Node]) -> fx.Node | None:
    """``values / values.sum(-1, keepdim=True)`` (optionally ``+ eps`` on the sum)."""
    for div in users:
        if div.target in _DIV and div.args[0] is values:
            den = source(div.args[1])
            if den.target in ADDS:
                den = source(next(a for a in den.args if isinstance(a, fx.Node)))
            if den.target in _SUM and source(den.args[0]) is values:
                return div
    return None


def _follow_gates(values: fx.Node, active: set[fx.Node]) -> tuple[fx.Node | None, dict[str, Any]]:
    """Walk the gate values to the combine; returns it (or None) and what was found."""
    found: dict[str, Any] = {"normalized": False, "factor": 1.0, "parts": []}
    node = values
    for _ in range(16):
        users = consumers(node)
        renorm = _renormaliser(node, users)
        if renorm is not None:
            found["normalized"] = True
            found["parts"] += [renorm, source(renorm.args[1])]
            node = renorm
            continue
        if len(users) != 1:
            return None, found
        (user,) = users
        if user.target in _GATHER and user.args[0] is not node and source(user.args[0]) is not node:
            return None, found  # the gates index something else: not a weight path
        if user.target in _GATHER or user.target in TRANSPARENT:
            node = user
            continue
        if user.target in _SCATTER and len(user.args) > 3 and source(user.args[3]) is node:
            found["parts"].append(user)
            node = user
            continue
        if user.target in _MUL and len(user.args) == 2:
            other = user.args[1] if source(user.args[0]) is node or user.args[0] is node else user.args[0]
            if isinstance(other, (int, float)):
                found["factor"] *= float(other)
                node = user
                continue
            if isinstance(other, fx.Node) and other in active:
                found["gate_index"] = 0 if other is user.args[1] else 1
                return user, found
        if user.target in _EINSUM and len(user.args[1]) == 2:
            found["gate_index"] = 0 if source(user.args[1][0]) is node or user.args[1][0] is node else 1
            return user, found
        return None, found
    return None, found


def _topk_sum(combine: fx.Node, k: int, dense: int | None = None) -> fx.Node | None:
    """The sum over the k routed copies after the combine: a view to [T, k, d] summed
    over k, rows added back to their tokens (``index_add`` / ``scatter_add``), or, for
    gates scattered into a dense [.., E] (``dense`` = E, zero off the top k), the sum over
    the E experts' axis."""
    node = combine
    for _ in range(8):
        users = consumers(node)
        if len(users) != 1:
            return None
        (user,) = users
        if user.target in _SUM:
            dims = user.args[1]
            shape = user.args[0].meta["val"].shape
            return user if len(dims) == 1 and int(shape[dims[0]]) in (k, dense) else None
        if user.target in _ACCUMULATE:  # index_add(zeros, 0, token_of_row, weighted)
            return user
        if user.target not in _GATHER:
            return None
        node = user
    return None


def _router_grad_at_init(k: int, experts: int, p0: float, *, sigmoid: bool,
                         normalized: bool) -> float:
    """The RMS of the router logits' gradient at init for a unit gradient at the combine's
    output (rules §10, "The router's gradient"). Each gate's gradient is the combine
    scale's ``c = 1 / (g0 sqrt(k))`` (the gate's own ``d^-1/2`` makes it a mean); the
    renormalisation ``v / sum v`` removes the gates' common part and divides by
    ``sum v = k p0``; the probability's derivative is ``p0`` (softmax) or ``p0 (1 - p0)``
    (sigmoid); only k of the E logits get it. Constant factors on the gates cancel
    against ``c``. So ``sqrt((k - 1) / (k E))`` renormalised softmax gates, ``E^-1/2``
    plain softmax, ``1 / (2 sqrt(E))`` sigmoid; 0 for one renormalised gate (always 1)."""
    slope = p0 * (1 - p0) if sigmoid else p0
    if normalized:  # c = sqrt(k); (g - sum g dg) / (k p0): the centred part, sqrt(1 - 1/k)
        per_gate = math.sqrt(k) * math.sqrt(1 - 1 / k) / (k * p0)
    else:  # c = 1 / (p0 sqrt(k))
        per_gate = 1 / (p0 * math.sqrt(k))
    return math.sqrt(k / experts) * per_gate * slope


_KEEP_RULES = {None, rules.SOFTMAX, rules.ACTIVATION, rules.POOL, rules.MATMUL, rules.ROUTER}


def _mark_routing_statistics(routers: list[fx.Node], active: set[fx.Node]) -> None:
    """Everything computed from router logits alone (expert loads, a load-balancing
    loss, logits returned for one) keeps the model's numbers: rule "router". The walk
    stops at ops that also read other activations (combines, gathers of tokens, the
    experts' matmuls), which have rules of their own."""
    derived: set[fx.Node] = set(routers)
    frontier = [u for r in routers for u in r.users]
    while frontier:
        node = frontier.pop()
        if node in derived or node.op != "call_function":
            continue
        inputs = [a for a in node.all_input_nodes if a in active]
        if not inputs or any(a not in derived for a in inputs):
            continue
        derived.add(node)
        if meta.get(node, meta.RULE) in _KEEP_RULES and node.target is not operator.getitem:
            meta.node_meta(node)[meta.RULE] = rules.ROUTER
        frontier.extend(node.users)


def _mark(node: fx.Node, rule: str, **extra: Any) -> None:
    m = meta.node_meta(node)
    m[meta.RULE] = rule
    m.update(extra)


def find_routing(gm: fx.GraphModule) -> PassResult:
    """Mark routers, their probabilities and the gated combines; see the module docstring."""
    active = param_dependent(gm)
    notes = meta.graph_meta(gm).setdefault(meta.NOTES, [])
    routers: list[fx.Node] = []
    for probs in list(gm.graph.nodes):
        if probs.target not in SOFTMAXES | _SIGMOID or probs not in active:
            continue
        router = _router_linear(probs)
        picked = _top_logits(probs) if router is None else None
        if router is None and picked is None:
            continue
        users = consumers(probs)
        topk = next((u for u in users if u.target in _TOPK), None)
        n_choices = int(probs.meta["val"].shape[-1])
        gathered = next((u for u in users if u.target in _GATHER_DIM and u.args[0] is probs), None)
        if picked is not None:  # softmax over the top k logits: renormalised gates
            router, topk = picked
            k, values, n_choices = int(topk.args[1]), probs, int(router.meta["val"].shape[-1])
        elif topk is not None:
            k = int(topk.args[1])
            values = next((u for u in topk.users if u.args[1] == 0), None)
        elif gathered is not None:  # DeepSeek: top-k chosen on biased scores, then gathered
            k, values = int(gathered.meta["val"].shape[-1]), gathered
        elif probs.target in _SIGMOID and n_choices == 1:
            k, values = 1, probs  # a scalar gate per token (a shared expert's)
        else:
            continue
        p0 = 1 / n_choices if probs.target in SOFTMAXES else 0.5
        weight = meta.get(router, meta.WEIGHT)
        link = {"router": weight}
        meta.node_meta(router)[meta.MOE] = link
        routers.append(router)
        _mark(probs, rules.ROUTER, **{meta.MOE: link})
        combine, found = _follow_gates(values, active) if values is not None else (None, {})
        if combine is None:
            notes.append(f"router {weight}: its gates were not followed to the experts' "
                         f"product ({where(probs)}); that combine keeps the model's scale")
            continue
        if picked is not None:
            found["normalized"] = True
        g0 = (1 / k if found["normalized"] else p0) * found["factor"]
        scattered = any(part.target in _SCATTER for part in found["parts"])
        summed = _topk_sum(combine, k, n_choices if scattered else None)
        for part in found["parts"] + ([summed] if summed is not None else []):
            _mark(part, rules.PATTERN_PART)
        link["grad_at_init"] = _router_grad_at_init(
            k, n_choices, p0, sigmoid=probs.target in _SIGMOID, normalized=found["normalized"])
        if link["grad_at_init"] == 0:
            notes.append(f"router {weight}: its one gate per token is renormalised to 1 "
                         f"({where(probs)}), so no gradient reaches the router through the "
                         "gates; it learns only from a loss on its logits (load balancing), "
                         "as in the model as written")
        _mark(combine, rules.MOE_COMBINE, **{meta.MOE: {
            "scale": 1 / (g0 * math.sqrt(k)), "k": k, "experts": n_choices,
            "gate_at_init": g0, "normalized": found["normalized"], "router": weight,
            "sum": summed.name if summed is not None else None,
            "gate_index": found["gate_index"],
        }})
    _mark_routing_statistics(routers, active)
    return PassResult(gm, False)


def scale_moe_combines(gm: fx.GraphModule) -> PassResult:
    """Swap each combine for ``ops.combine_experts`` with its ``umup.moe`` scale."""
    nodes = nodes_with_rule(gm, rules.MOE_COMBINE)
    for node in nodes:
        info = meta.get(node, meta.MOE)
        gi = info["gate_index"]
        if node.target in _EINSUM:
            operands = node.args[1]
            kwargs = {"equation": node.args[0], "gates_first": gi == 0}
        else:
            operands, kwargs = node.args, {}
        swap(node, ops_.combine_experts, (operands[1 - gi], operands[gi]),
             {"scale": info["scale"], **kwargs})
    return PassResult(gm, bool(nodes))
