"""Constants a model multiplies in itself where u-muP sets the scale (rules §3).

Gemma multiplies its embeddings by ``sqrt(d_model)`` and T5 (tied) its last hidden
state by ``d_model^-1/2`` before the LM head. Those constants are the model's own
way to fix a scale that u-muP's embedding and readout rules now fix, so keeping them
would apply the scale twice (T5's logits came out 8x small). A multiply (or divide) of
an activation by a constant (a Python number, or a one-element tensor that no
parameter feeds) is *neutralised* when it sits directly on an embedding's output, on
the input of a linear whose use is a readout (role ``output``), on a readout's output
(Granite's ``logits_scaling``, Cohere's ``logit_scale``), on SDPA's query or key
(Whisper's ``q * d^-1/2`` with ``scale=1``: u-muP's SDPA sets the logit scale), or on a
linear's output that only residual adds read (Granite's ``residual_multiplier``: §4's
tau weights the branches).

Reads: ``umup.rule``; graph key ``roles`` (per-use roles of tied weights).
Writes: ``umup.rule = "model_scale"`` on those nodes; graph key ``notes`` (one line
each, shown in the report). ``drop_model_scales`` erases them, recording each in graph
key ``replaced`` and moving a residual branch that started there to the operand.
Fails when: never.
"""

from __future__ import annotations

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from umup_fx import meta, rules

from ._graph import ADDS, DIVS, MULS, consumers, ops, param_dependent, source, where

_ADDMM = ops("addmm")


def _from_call(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose value depends on a call's tensor argument (a user input)."""
    out: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if (node.op == "placeholder" and meta.get(node, meta.KIND) == "input") or any(
                a in out for a in node.all_input_nodes):
            out.add(node)
    return out


def _constant_operand(node: fx.Node, active: set[fx.Node]) -> fx.Node | None:
    """The activation operand of ``x * c`` / ``x / c`` with ``c`` a constant, else None.
    ``active`` holds the nodes that are no constant: the activations and, for tensors,
    whatever a call's tensor argument feeds (its value changes between calls)."""
    if node.target not in (MULS | DIVS) or len(node.args) != 2:
        return None
    x, c = node.args
    if node.target in MULS and not (isinstance(x, fx.Node) and x in active):
        x, c = c, x
    if not (isinstance(x, fx.Node) and x in active):
        return None
    if isinstance(c, (int, float)):
        return x
    val = c.meta.get("val") if isinstance(c, fx.Node) else None
    if (isinstance(c, fx.Node) and c not in active and isinstance(val, torch.Tensor)
            and val.numel() == 1):
        return x
    return None


def _is_readout(u: fx.Node, roles: dict) -> bool:
    """``u`` is a linear whose use of its weight is a readout (role ``output``)."""
    if meta.get(u, meta.RULE) != rules.LINEAR:
        return False
    weight = meta.get(u, meta.WEIGHT)
    use_roles = [use.role for use in roles[weight].uses if use.node == u.name]
    return (use_roles or [roles[weight].role])[0] == rules.OUTPUT


def _readout_uses(node: fx.Node, roles: dict) -> bool:
    """True when every consumer (through views) is a readout linear taking ``node`` as x."""
    users = consumers(node)
    if not users:
        return False
    for u in users:
        if not _is_readout(u, roles):
            return False
        if source(u.args[1] if u.target in _ADDMM else u.args[0]) is not node:
            return False
    return True


def _where_it_sits(node: fx.Node, x: fx.Node, roles: dict) -> str | None:
    """Which of u-muP's own scales the constant ``node = x * c`` duplicates, if any."""
    if meta.get(source(x), meta.RULE) == rules.EMBEDDING:
        return "embedding output"
    if _readout_uses(node, roles):
        return "readout input"
    producer = source(x)
    if _is_readout(producer, roles):
        return "logits"  # logits / logits_scaling, logits * logit_scale
    users = consumers(node)
    if users and all(meta.get(u, meta.RULE) == rules.SDPA and node in (
            source(u.args[0]), source(u.args[1])) for u in users):
        return "attention query / key"  # q * d^-1/2 before SDPA(scale=1)
    if (meta.get(producer, meta.RULE) == rules.LINEAR and users
            and all(u.target in ADDS and len(u.args) == 2 and all(
                isinstance(a, fx.Node) for a in u.args) for u in users)):
        return "residual branch"  # h + c * o_proj(...): u-muP's tau weights branches
    return None


def find_model_scales(gm: fx.GraphModule) -> PassResult:
    """Mark a model's own embedding / readout constants; see the module docstring.
    A one-element tensor that a call's argument feeds is the caller's, not the model's:
    dropping it would ignore the argument, so it stays."""
    g = meta.graph_meta(gm)
    roles = g[meta.ROLES]
    active = param_dependent(gm) | _from_call(gm)
    notes = g.setdefault(meta.NOTES, [])
    for node in gm.graph.nodes:
        if node.op != "call_function" or meta.get(node, meta.RULE) is not None:
            continue
        x = _constant_operand(node, active)
        if x is None:
            continue
        what = _where_it_sits(node, x, roles)
        if what is not None:
            meta.node_meta(node)[meta.RULE] = rules.MODEL_SCALE
            notes.append(f"the model's own constant on its {what} is dropped (u-muP "
                         f"sets that scale): {where(node)}")
    return PassResult(gm, False)


def drop_model_scales(gm: fx.GraphModule) -> PassResult:
    """Rewrite: each ``model_scale`` multiply becomes its activation operand."""
    active = param_dependent(gm)
    changed = False
    for node in list(gm.graph.nodes):
        if meta.get(node, meta.RULE) == rules.MODEL_SCALE:
            x = _constant_operand(node, active)
            node.replace_all_uses_with(x)
            g = meta.graph_meta(gm)
            g.setdefault(meta.REPLACED, {})[node.name] = x.name
            for branch in g.get(meta.BRANCHES, []):  # the first residual starts here
                if branch.skip == node.name:
                    branch.skip = x.name
            gm.graph.erase_node(node)
            changed = True
    return PassResult(gm, changed)


def model_scale_constants(gm: fx.GraphModule) -> dict[str, tuple]:
    """The numbers ``find_model_scales`` marked to drop, by the source line that
    multiplies them in (``where``). A transformed model compares them between call
    structures: one that differs came from a call's non-tensor argument, which the
    dropped multiply would silently ignore."""
    active = param_dependent(gm)
    found: dict[str, set] = {}
    for node in gm.graph.nodes:
        if meta.get(node, meta.RULE) != rules.MODEL_SCALE:
            continue
        x = _constant_operand(node, active)
        for c in node.args:
            if c is not x and isinstance(c, (int, float)):
                found.setdefault(where(node), set()).add(c)
    return {k: tuple(sorted(v)) for k, v in found.items()}
