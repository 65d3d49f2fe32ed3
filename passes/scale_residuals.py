"""Rewrite residual adds (§3, §4) and plain adds of two activations.

For each residual branch ``y = skip + f(skip)`` the skip value is split once,
``(branch_in, skip_out) = ops.residual_split(skip, tau)`` (backward-only scales
``tau/sqrt(1+tau^2)`` and ``1/sqrt(1+tau^2)``), the branch reads ``branch_in``, and the
add becomes ``ops.residual_add(f, skip_out, tau)`` = ``(tau f + skip)/sqrt(1+tau^2)``.
Plain adds become ``ops.add`` (``2^-1/2``, tied).

Reads: graph key ``branches`` (add and skip node names, tau);
``umup.rule`` = "add".
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
from ._rewrite import ancestors, getitem, insert_call, nodes_with_rule, swap


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
        swap(node, ops.add, tuple(node.args[:2]))
    return PassResult(gm, True)
