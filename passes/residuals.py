"""Residual branches (§4): which adds are residual, their kind, depth L and tau.

``add(skip, f(skip))`` is residual when ``skip`` reaches the other operand through at
least one weight-bearing op. The branch is every node between the two; it is an
"attention" branch when it holds SDPA, a hand-written attention or a softmax, else
"mlp". Branch i (forward order) gets tau_i from ``rules.residual_taus``. Parameters
used inside a branch are depth-scaled (their LR gets L^-1/2). Other adds of two
activations are plain adds (rule ``add``), except sums of products with constants
(RoPE's ``q*cos + rotate(q)*sin``), which keep scale and pass through, and a linear's
low-rank update ``W x + s * B(A(x))`` (LoRA's adapter: a change of the weight, not a
second branch), which passes through too: with ``B = 0`` the model is the base model.
A sum of embedding lookups (BERT's word + token type + position, GPT-2's wte + wpe,
broadcast over the batch or not), each read by the sum alone, is one sum of tables
(rule ``table_sum`` on each of its adds; rules §3).

Reads: ``umup.rule``, ``umup.param``; ``gm.meta["umup"]["hparams"]``.
Writes: ``umup.rule = "residual_add"`` and ``umup.residual`` (a ``Branch``) on residual
adds, ``umup.rule = "add"`` on plain adds (and ``umup.broadcast`` where their operands
differ in shape; a broadcast add is never residual), ``umup.keeps_scale`` on rotations
and low-rank updates (no rule),
``umup.rule = "table_sum"`` on the adds of a sum of tables;
graph keys ``branches``, ``depth_scaled``, and a ``notes`` line when some adds are
post-norm (``Branch.post_norm``: the add feeds only a norm, as in BERT;
rules §4 says what u-muP assumes there).
Fails when: never.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import networkx as nx
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from umup_fx import meta, rules
from umup_fx.hparams import HParams

from ._graph import (
    ADDS,
    ASSERTS,
    DROPOUTS,
    MULS,
    TRANSPARENT,
    consumers,
    inplace_safe,
    is_tensor,
    param_dependent,
    param_of,
    source,
    where,
)

_ATTENTION_RULES = {rules.SDPA, rules.ATTENTION, rules.SOFTMAX}
_WEIGHT_RULES = {rules.LINEAR, rules.EMBEDDING, rules.CONV}


@dataclass
class Branch:
    index: int
    kind: str  # "attention" | "mlp"
    add: str  # the residual add node
    skip: str  # the node the branch starts from (and the skip path carries)
    tau: float = 1.0
    params: list[str] = field(default_factory=list)
    region: str = ""  # the block it lies in ("" for the root), filled by plan.expand_blocks
    post_norm: bool = False  # the add feeds only a norm (post-LN: BERT, the original T)
    stream: int = 0  # the residual stream (an encoder-decoder has two), numbered in order


def _stream_source(node: fx.Node) -> fx.Node:
    """What a skip carries, through views, dropout and norms (post-LN skips read norm(add))."""
    while (isinstance(node, fx.Node) and node.op == "call_function" and node.args
           and (node.target in TRANSPARENT or node.target in DROPOUTS
                or meta.get(node, meta.RULE) == rules.NORM_OP)):
        node = node.args[0]
    return node


def _feeds_only_norms(add: fx.Node) -> bool:
    users = consumers(add)
    return bool(users) and all(meta.get(u, meta.RULE) == rules.NORM_OP for u in users)


def _is_rotary_mix(add: fx.Node, active: set[fx.Node]) -> bool:
    """a*c1 + b*c2 with c1, c2 constants (no parameter): a rotation, scale-preserving."""
    for operand in add.args[:2]:
        if not (isinstance(operand, fx.Node) and operand.target in MULS):
            return False
        if all(isinstance(a, fx.Node) and a in active for a in operand.args[:2]):
            return False
    return True


def _linear_input(node: fx.Node) -> Any:
    """The activation a linear reads, through transparent ops and dropout."""
    x = source(node.args[0])
    while isinstance(x, fx.Node) and x.op == "call_function":
        if x.target in DROPOUTS:
            x = source(x.args[0])
        elif (getattr(x.target, "__name__", "") == "getitem" and isinstance(x.args[0], fx.Node)
              and x.args[0].target in DROPOUTS):
            x = source(x.args[0].args[0])  # native_dropout's (output, mask)
        else:
            break
    return x


def _is_low_rank_update(add: fx.Node) -> bool:
    """``linear(x, W) + s * linear(linear(x, A), B)`` with A's output narrower than B's
    (LoRA; ``s`` a Python number, ``x`` seen through dropout): rules, "LoRA adapters"."""
    for base, update in (add.args[:2], add.args[1::-1]):
        base, up = source(base), source(update)
        while isinstance(up, fx.Node) and up.target in MULS and not isinstance(up.args[1], fx.Node):
            up = source(up.args[0])
        if not (meta.get(base, meta.RULE) == rules.LINEAR == meta.get(up, meta.RULE)):
            continue
        down = _linear_input(up)
        if (meta.get(down, meta.RULE) == rules.LINEAR
                and down.meta["val"].shape[-1] < up.meta["val"].shape[-1]
                and _linear_input(down) is _linear_input(base)):
            return True
    return False


def _own_path(x: fx.Node, add: fx.Node, active: set[fx.Node]) -> bool:
    """Each activation that ``x`` is computed from feeds only ``x``'s computation, and
    ``x`` feeds ``add`` alone: the edge into ``add`` is a cut edge (unit scaling's term), so a constant on
    its gradient only rescales the gradients of the parameters behind it (rules §3,
    "A broadcast add"). Parameters themselves may be read elsewhere (tied tables)."""
    inside, frontier = {x}, [x]
    while frontier:
        for a in frontier.pop().all_input_nodes:
            if a in active and param_of(a) is None and a not in inside:
                inside.add(a)
                frontier.append(a)
    return all(u in inside or (n is x and u is add) or u.target in ASSERTS
               for n in inside for u in n.users)


def _mark_plain_add(add: fx.Node, active: set[fx.Node]) -> None:
    """Rule ``add`` on ``add`` (or ``umup.keeps_scale`` on a rotation / low-rank update);
    on a broadcast one, ``umup.broadcast``: which operands are broadcast and have their
    own path, so their summed gradient can be brought back to unit."""
    if _is_rotary_mix(add, active):
        meta.node_meta(add)[meta.KEEPS_SCALE] = "rotation"
        return
    if _is_low_rank_update(add):
        meta.node_meta(add)[meta.KEEPS_SCALE] = "low-rank update"
        return
    meta.node_meta(add)[meta.RULE] = rules.ADD
    a, b = add.args[:2]
    shape = add.meta["val"].shape
    broadcast = tuple(x.meta["val"].shape != shape for x in (a, b))
    if any(broadcast):
        own = tuple(bc and _own_path(x, add, active) for x, bc in zip((a, b), broadcast,
                                                                       strict=True))
        meta.node_meta(add)[meta.BROADCAST] = own
        if own != broadcast:
            g = meta.graph_meta(add.graph.owning_module)
            g.setdefault(meta.NOTES, []).append(
                f"{add.name} ({where(add)}) adds a broadcast activation that other ops "
                "read too: its gradient, summed over the broadcast axes, is left as the "
                "plain add's (tied, not brought back to unit; rules §3 'A broadcast add')"
            )


def _summed_tables(add: fx.Node) -> list[fx.Node] | None:
    """The operands of a sum of embedding lookups: ``add``'s, with the adds nested in it
    that only it reads opened up; each lookup read by the sum alone (through casts and
    views). None when some operand is anything else (rules §3, "Sum of tables")."""
    if add.target not in ADDS or len(add.args) != 2 or add.kwargs or not inplace_safe(add):
        return None
    tables: list[fx.Node] = []
    for x in add.args:
        if not is_tensor(x):
            return None
        if meta.get(x, meta.RULE) is None and list(x.users) == [add] and _summed_tables(x):
            tables += _summed_tables(x) or []
        elif meta.get(source(x), meta.RULE) == rules.EMBEDDING and consumers(source(x)) == [add]:
            tables.append(x)
        else:
            return None
    return tables


def _mark_table_sums(gm: fx.GraphModule) -> None:
    """``umup.rule = "table_sum"`` on every add of a sum of lookups, outermost first."""
    for node in reversed(gm.graph.nodes):
        if meta.get(node, meta.RULE) is None and _summed_tables(node):
            stack = [node]
            while stack:
                add = stack.pop()
                meta.node_meta(add)[meta.RULE] = rules.TABLE_SUM
                stack += [x for x in add.args if x.target in ADDS and list(x.users) == [add]
                          and _summed_tables(x)]


def find_residuals(gm: fx.GraphModule) -> PassResult:
    """Find residual branches and plain adds; see the module docstring."""
    hp: HParams = meta.graph_meta(gm).get(meta.HPARAMS) or HParams()
    graph = nx.DiGraph()
    for node in gm.graph.nodes:
        graph.add_node(node)
        for src in node.all_input_nodes:
            graph.add_edge(src, node)
    active = param_dependent(gm)
    found: list[tuple[fx.Node, fx.Node, set[fx.Node]]] = []
    claimed: set[fx.Node] = set()
    _mark_table_sums(gm)
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in ADDS or len(node.args) < 2:
            continue
        if meta.get(node, meta.RULE) is not None or not inplace_safe(node):
            continue  # part of a recognised pattern (a hand-written GELU's inner add)
        a, b = node.args[:2]
        if not (is_tensor(a) and is_tensor(b) and a in active and b in active):
            continue
        if a.meta["val"].shape != b.meta["val"].shape:  # broadcast: never residual
            _mark_plain_add(node, active)
            continue
        residual = None
        for skip, out in ((a, b), (b, a)):
            if nx.has_path(graph, skip, out):
                body = (nx.descendants(graph, skip) & nx.ancestors(graph, out)) | {out}
                if any(meta.get(n, meta.RULE) in _WEIGHT_RULES for n in body):
                    residual = (skip, body)
                    break
        if residual and not (residual[1] & claimed):
            found.append((node, residual[0], residual[1]))
            claimed |= residual[1]
        else:
            _mark_plain_add(node, active)

    kinds = [
        "attention" if any(meta.get(n, meta.RULE) in _ATTENTION_RULES for n in body) else "mlp"
        for _, _, body in found
    ]
    # A branch continues the stream whose last add its skip carries; else a new stream.
    streams: list[int] = []
    last_add: dict[int, fx.Node] = {}
    for _, skip, _ in found:
        carried = _stream_source(skip)
        stream = next((s for s, add in last_add.items() if add is carried), len(last_add))
        streams.append(stream)
        last_add[stream] = next(a for a, sk, _ in found if sk is skip)
    taus, _ = rules.stream_taus(kinds, streams, hp)
    branches, depth_scaled = [], set()
    for i, ((add, skip, body), kind, tau) in enumerate(zip(found, kinds, taus, strict=False)):
        params = sorted(  # through views: x @ W.T reads W via a transpose
            {param_of(p) for n in body for p in n.all_input_nodes if param_of(p)}
        )
        # The last add of a pre-norm stack (of each stream: an encoder's too) also feeds
        # only the final norm; an earlier one that does is post-norm (its successor
        # reads the normalised sum).
        last_of_stream = all(streams[j] != streams[i] for j in range(i + 1, len(found)))
        post_norm = not last_of_stream and _feeds_only_norms(add)
        branch = Branch(i, kind, add.name, skip.name, tau, params, post_norm=post_norm,
                        stream=streams[i])
        m = meta.node_meta(add)
        m[meta.RULE] = rules.RESIDUAL_ADD
        m[meta.RESIDUAL] = branch
        branches.append(branch)
        depth_scaled.update(params)
    g = meta.graph_meta(gm)
    post = [b for b in branches if b.post_norm]
    if post:
        g.setdefault(meta.NOTES, []).append(
            f"{len(post)} of {len(branches)} residual adds are post-norm (a norm right after "
            "the add): the residual rule (rules §4) is written for pre-norm blocks; here the "
            "norm resets the stream's scale, so tau only weighs branch against skip, and "
            "transfer across depth is not what u-muP promises (across width it holds)"
        )
    g[meta.BRANCHES] = branches
    g[meta.DEPTH_SCALED] = depth_scaled
    return PassResult(gm, False)
