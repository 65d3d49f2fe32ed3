"""Leave the sizes that tensor parallelism divides to the run time.

A captured graph spells every reshape's sizes out: ``q.view(B, T, 2, 16)`` where the
model wrote ``view(B, T, -1, head_dim)`` or ``view(B, T, n_heads, head_dim)``. Under
tensor parallelism a column-parallel projection hands each rank a shard of its output
features (here one head of two), and a spelled-out head count no longer fits. This pass
writes ``-1`` for the size that scales with a projection's width (the head count, or
the merged feature axis), so the graph computes the same thing on a full tensor and on
a rank's shard, as the model as written does.

Reads: ``umup.dims`` on view / reshape / expand nodes; the dims solver
(``gm.meta["umup"]["solver"]``) for which dims are width-like (rules §1).
Writes: the size argument of those nodes (one entry per node, at most).
Fails when: never; a node whose sizes it cannot read is left as it is.
"""

from __future__ import annotations

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from umup_fx import meta

from ._graph import ops
from .dim_solver import WIDTH

_RESHAPES = ops("view.default", "reshape.default", "_unsafe_view.default")
_EXPANDS = ops("expand.default")


def _free_axis(node: fx.Node, sizes: list, solver) -> int | None:
    """The outermost spelled-out size whose dim is width-like, when no size is free yet."""
    dims = meta.get(node, meta.DIMS)
    if not isinstance(dims, tuple) or len(dims) != len(sizes) or -1 in sizes:
        return None
    source = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    for axis, (size, dim) in enumerate(zip(sizes, dims, strict=True)):
        if not isinstance(size, int) or size <= 1:
            continue
        try:
            width = solver.kind_of(dim) == WIDTH
        except (KeyError, AttributeError, TypeError):
            return None
        if not width:
            continue
        if node.target in _EXPANDS:  # -1 keeps the input's size: only where it is that size
            offset = len(sizes) - source.dim() if source is not None else -1
            if offset < 0 or axis < offset or source.shape[axis - offset] != size:
                return None
        return axis
    return None


def free_shard_sizes(gm: fx.GraphModule) -> PassResult:
    """Write -1 for each reshape's / expand's width-like size (see the module docstring)."""
    solver = meta.graph_meta(gm).get(meta.SOLVER)
    if solver is None:
        return PassResult(gm, False)
    changed = False
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _RESHAPES | _EXPANDS:
            continue
        sizes = list(node.args[1]) if len(node.args) > 1 and isinstance(node.args[1], (list, tuple)) else None
        if sizes is None:
            continue
        axis = _free_axis(node, sizes, solver)
        if axis is None:
            continue
        sizes[axis] = -1
        node.args = (node.args[0], sizes, *node.args[2:])
        changed = True
    if changed:
        gm.recompile()
    return PassResult(gm, changed)
