"""Rewrite residual adds (§3, §4) and plain adds of two activations.

For each residual branch ``y = skip + f(skip)`` the skip value is split once,
``(branch_in, skip_out) = ops.residual_split(skip, tau)`` (backward-only scales
``tau/sqrt(1+tau^2)`` and ``1/sqrt(1+tau^2)``), the branch reads ``branch_in``, and the
add becomes ``ops.residual_add(f, skip_out, tau)`` = ``(tau f + skip)/sqrt(1+tau^2)``.
Plain adds become ``ops.add`` (``2^-1/2``, tied; an operand broadcast on its own path
gets its summed gradient back to unit at the reference sizes). A sum of n tables becomes one
``ops.add_tables`` of its lookups (``n^-1/2`` forward; each table's gradient the sum's,
times its broadcast factor at the reference sizes); its nested adds are erased.

Reads: graph key ``branches`` (add and skip node names, tau);
``umup.rule`` = "add" / "table_sum"; ``umup.broadcast`` on broadcast adds.
Writes: inserts ``residual_split`` + two ``getitem`` nodes per branch (the split gets
``umup.residual`` too); swaps the adds.
Fails when: never.
"""

from __future__ import annotations

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from umup_fx import meta, rules
from umup_fx.runtime import ops

from ._graph import value_inputs
from ._rewrite import ancestors, example_numel, getitem, insert_call, nodes_with_rule, swap


def scale_residuals(gm: fx.GraphModule) -> PassResult:
    """Split each residual skip and scale its add; see the module docstring."""
    by_name = {n.name: n for n in gm.graph.nodes}
    for branch in meta.graph_meta(gm)[meta.BRANCHES]:
        add, skip = by_name[branch.add], by_name[branch.skip]
        branch_out = next(a for a in add.args[:2] if a is not skip)
        inside = ancestors(branch_out) | {branch_out}
        # Readers of the skip's dtype only (``mask.type_as(h)``, Meta's llama) neither
        # place the split nor read its branch side.
        readers = [u for u in skip.users if skip in value_inputs(u)]
        first_user = min(readers, key=lambda u: list(gm.graph.nodes).index(u))
        split = insert_call(gm, first_user, ops.residual_split, (skip, branch.tau))
        branch_in = getitem(gm, first_user, split, 0, like=skip)
        skip_out = getitem(gm, first_user, split, 1, like=skip)
        for user in readers:
            if user in inside:
                user.replace_input_with(skip, branch_in)
        swap(add, ops.residual_add, (branch_out, skip_out, branch.tau))
        meta.node_meta(split)[meta.RESIDUAL] = branch
    for node in nodes_with_rule(gm, rules.ADD):
        swap(node, ops.add, tuple(node.args[:2]), _broadcast_grad_scales(node))
    scale_table_sums(gm)
    return PassResult(gm, True)


def _broadcast_grad_scales(add: fx.Node) -> dict:
    """``ops.add``'s ``grad_scales`` where an operand is broadcast on its own path: the
    plain add's tied ``2^-1/2`` times ``(its numel / the sum's numel)^1/2`` at the
    reference sizes (its gradient is summed over the axes it was broadcast along)."""
    own = meta.get(add, meta.BROADCAST)
    numel = example_numel(add)
    if not own or not any(own) or numel is None:
        return {}
    scales = []
    for x, corrected in zip(add.args[:2], own, strict=True):
        k = example_numel(x)
        scales.append(2**-0.5 * ((k / numel) ** 0.5 if corrected and k else 1.0))
    return {"grad_scales": tuple(scales)}


def _is_table_sum(node: object) -> bool:
    return isinstance(node, fx.Node) and meta.get(node, meta.RULE) == rules.TABLE_SUM


def scale_table_sums(gm: fx.GraphModule) -> None:
    """Each outermost ``table_sum`` add -> ``ops.add_tables(*lookups)``; nested ones erased."""
    sums = nodes_with_rule(gm, rules.TABLE_SUM)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for root in sums:
        if any(_is_table_sum(u) for u in root.users):
            continue  # nested: its outermost add takes its tables
        tables, stack = [], [root]
        while stack:
            for x in stack.pop().args:
                (stack if _is_table_sum(x) else tables).append(x)
        tables.sort(key=order.__getitem__)  # forward order
        numel, numels = example_numel(root), [example_numel(t) for t in tables]
        scales = None if numel is None or None in numels else [(k / numel) ** 0.5 for k in numels]
        swap(root, ops.add_tables, tuple(tables), {"grad_scales": scales})
    for node in reversed(sums):
        if node.target is not ops.add_tables and not node.users:
            gm.graph.erase_node(node)
