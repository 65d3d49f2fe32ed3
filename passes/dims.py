"""Dimension analysis: a sympy expression for every axis of every tensor in the graph.

Rules §1: dims of model inputs and outputs, embedding rows and loss classes are
*fixed*; dims the ops equate to them are fixed; every other parameter dim is
*width-like*. Each parameter axis starts as its own symbol; every op equates the axes
it ties together (``linear``: x[-1] = W[1]), reshapes introduce products
(``d_model = n_heads * d_head``), and a small solver eliminates symbols until each
class of equal dims is one expression. Widening a model changes the symbols' values,
never the expressions.

Reads: ``node.meta["val"]`` (shapes, from capture), ``umup.kind`` on placeholders.
Writes: ``umup.dims`` on every tensor-valued node; ``gm.meta["umup"]["solver"]``.
Fails when: never; an op with no shape rule and a shape unlike its inputs' gets fresh
symbols, and is listed in ``solver.unknown_ops`` (the report shows it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sympy as sp
import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from umup_fx import meta

from ._graph import is_grouped_mm, op_name
from .dim_solver import (
    FIXED,
    NEUTRAL,
    WIDTH,
    Dims,
    DimSolver,
    SymbolInfo,
    broadcastable,
    fake_value,
    flat_args,
    is_tensor,
    shape_of,
    size_hint,
)
from .shape_rules import MULTI_RULES, RULES, grouped_mm_rule

aten = torch.ops.aten


class Propagator:
    """Runs the per-op shape rules over the graph, in order."""

    def __init__(self, gm: fx.GraphModule, solver: DimSolver) -> None:
        self.gm = gm
        self.s = solver
        self.export_syms: dict[sp.Symbol, sp.Symbol] = {}
        self.contracted: list[sp.Expr] = []  # input-feature dims of weight ops
        self.hidden_outputs: list[sp.Expr] = []  # output dims kept width-like

    # -- helpers ---------------------------------------------------------------
    def d(self, node: Any) -> Dims:
        return meta.get(node, meta.DIMS)

    def fresh(self, node: fx.Node, kind: str = NEUTRAL, sizes: Sequence[int] | None = None) -> Dims:
        sizes = shape_of(node) if sizes is None else sizes
        return tuple(
            sp.Integer(1) if n == 1 else self.s.new(kind, n, f"{node.name}[{i}]")
            for i, n in enumerate(sizes)
        )

    def from_export(self, size: Any, origin: str) -> sp.Expr | None:
        """Dynamic axes carry export's own symbols: those are data dims, hence fixed."""
        if isinstance(size, int):
            return None
        expr = size.node.expr
        if not isinstance(expr, sp.Expr) or expr.is_number:
            return None
        for sym in expr.free_symbols:
            if sym not in self.export_syms:
                env = size.node.shape_env
                hint = getattr(env, "backed_var_to_val", None) or env.var_to_val
                hint = hint.get(sym)
                self.export_syms[sym] = self.s.new(FIXED, int(hint or 2), origin, None)
        return expr.xreplace(self.export_syms)

    def broadcast(self, node: fx.Node, inputs: Sequence[Any]) -> Dims:
        """Right-aligned broadcasting: equal non-1 axes are the same dim."""
        shape = shape_of(node)
        out: list[sp.Expr | None] = [sp.Integer(1) if n == 1 else None for n in shape]
        for t in inputs:
            if not is_tensor(t):
                continue
            tdims, tshape = self.d(t), shape_of(t)
            for k in range(1, min(len(tshape), len(shape)) + 1):
                if tshape[-k] == shape[-k] and shape[-k] != 1:
                    if out[-k] is None:
                        out[-k] = tdims[-k]
                    else:
                        self.s.equate(out[-k], tdims[-k], node.name)
        return tuple(
            e if e is not None else self.s.new(NEUTRAL, shape[i], f"{node.name}[{i}]")
            for i, e in enumerate(out)
        )

    # -- the driver ------------------------------------------------------------
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op == "output":
                self.outputs(node)
                continue
            val = fake_value(node)
            if node.op == "placeholder":
                dims = self.placeholder(node)
            elif isinstance(val, torch.Tensor):
                dims = self.tensor_op(node)
            elif isinstance(val, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in val):
                dims = self.multi_op(node)
            else:
                continue
            if dims is None:
                continue
            if isinstance(val, torch.Tensor):
                dims = self.merge_export(node, val, dims)
            meta.node_meta(node)[meta.DIMS] = dims

    def merge_export(self, node: fx.Node, val: torch.Tensor, dims: Dims) -> Dims:
        out = list(dims)
        for i, size in enumerate(val.shape):
            e = self.from_export(size, f"{node.name}[{i}]")
            if e is not None:
                self.s.equate(out[i], e, node.name)
                out[i] = e
        return tuple(out)

    def placeholder(self, node: fx.Node) -> Dims | None:
        if not is_tensor(node) or not node.users:
            return None
        kind = meta.get(node, meta.KIND, "input")
        if kind == "param":
            name = meta.get(node, meta.PARAM)
            # A size-1 axis (a cls token's [1, 1, d]) is a broadcast axis, never a width.
            return tuple(
                sp.Integer(1) if n == 1 else self.s.new(WIDTH, n, f"{name}[{i}]")
                for i, n in enumerate(shape_of(node))
            )
        if kind == "input":
            return tuple(
                sp.Integer(1) if n == 1 else self.s.new(FIXED, n, f"{node.name}[{i}]")
                for i, n in enumerate(shape_of(node))
            )
        return self.fresh(node)

    def outputs(self, node: fx.Node) -> None:
        """Output dims are fixed (rules §1), except a width some weight op takes as its
        input features: the model returns hidden states (a backbone without a head, or
        T5's encoder states next to its logits), and that width still grows."""
        contracted = {self.s.resolve(e) for e in self.contracted}
        flat, _ = torch.utils._pytree.tree_flatten(node.args[0])
        for t in flat:
            if is_tensor(t) and self.d(t) is not None:
                for e in self.d(t):
                    e = self.s.resolve(e)
                    if e in contracted and self.s.kind_of(e) == WIDTH:
                        self.hidden_outputs.append(e)
                    else:
                        self.s.mark_fixed(e, "out")

    def tensor_op(self, node: fx.Node) -> Dims:
        rule = RULES.get(node.target) if node.op == "call_function" else None
        if is_grouped_mm(node.target):
            rule = grouped_mm_rule
        if rule is not None:
            return rule(self, node)
        inputs = [a for a in flat_args(node) if is_tensor(a)]
        shape = shape_of(node)
        if inputs and all(broadcastable(shape_of(t), shape) for t in inputs):
            return self.broadcast(node, inputs)
        self.s.unknown_ops.append(f"{node.name} ({op_name(node)})")
        return self.fresh(node)

    def multi_op(self, node: fx.Node) -> list[Dims]:
        rule = MULTI_RULES.get(node.target)
        if rule is not None:
            return rule(self, node)
        self.s.unknown_ops.append(f"{node.name} ({op_name(node)})")
        return [
            self.fresh(node, sizes=[size_hint(n) for n in v.shape])
            if isinstance(v, torch.Tensor)
            else ()
            for v in fake_value(node)
        ]





def _structural(path: str) -> str:
    """A parameter path with its list indices as ``*``: ``layers.*.attn.q_proj.weight``."""
    return ".".join("*" if part.isdigit() else part for part in path.split("."))


def _origin(info: SymbolInfo) -> tuple[str, int | None]:
    """``("layers.1.mlp.up_proj.weight", 0)`` from an origin ``"...weight[0]"``."""
    path, _, rest = info.origin.partition("[")
    axis = rest.rstrip("]")
    return path, int(axis) if axis.isdigit() else None


def _display_names(
    gm: fx.GraphModule, solver: DimSolver, data_syms: set[sp.Symbol] = frozenset()
) -> dict[sp.Symbol, str]:
    """Readable names, one per quantity.

    - Data dims (batch, sequence: export's dynamic sizes, and input axes no parameter
      has) are named ``batch`` / ``seq`` and flagged ``SymbolInfo.data``. The leading
      axes of all inputs of the batch's size are one ``batch``; other axes of a later
      input carry its name (``targets_seq``): lengths of two inputs may differ.
    - Width (and fixed) symbols of the same kind and example value that sit at the same
      parameter positions up to list indices (``layers.0.attn.q_proj.weight[0]`` and
      ``layers.1.attn.q_proj.weight[0]``) get one name, hence become one symbol: the
      graph does not tie blocks together, but they are the same quantity.
    - The most used width is ``d_model``; other widths are named after their parameter.
    """
    counts: dict[sp.Symbol, int] = {}
    places: dict[sp.Symbol, set[tuple[str, int]]] = {}
    inputs = set()
    for node in gm.graph.nodes:
        kind = meta.get(node, meta.KIND)
        if kind == "input":
            inputs.add(node.name)
        if kind != "param":
            continue
        name = _structural(meta.get(node, meta.PARAM) or node.name)
        for axis, e in enumerate(meta.get(node, meta.DIMS) or ()):
            for s in solver.resolve(e).free_symbols:
                counts[s] = counts.get(s, 0) + 1
                places.setdefault(s, set()).add((name, axis))
    used: set[str] = set()
    names: dict[sp.Symbol, str] = {}

    def claim(base: str) -> str:
        name, k = base, 2
        while name in used:
            name, k = f"{base}_{k}", k + 1
        used.add(name)
        return name

    survivors = [s for s in solver.info if s not in solver.subs]
    first_input, batch_size = None, None
    for s in survivors:
        info = solver.info[s]
        path, axis = _origin(info)
        from_input = path in inputs and s not in places
        if info.kind == FIXED and (s in data_syms or from_input):
            info.data = True
            if path in inputs and axis is not None:
                first_input = first_input or path
                if axis == 0 and batch_size in (None, info.value):
                    # Every input's leading axis of the batch's size is the batch: one
                    # symbol (targets next to tokens are not a second batch).
                    names[s], batch_size = "batch", info.value
                    used.add("batch")
                    continue
                base = ("batch", "seq")[axis] if axis < 2 else f"{path}_{axis}"
                if path != first_input:  # another input's length (targets, decoder ids)
                    base = f"{path}_{base}"
            else:
                base = "data"
            names[s] = claim(base)

    # One group per quantity: same kind, value and structural place.
    groups: dict[tuple, list[sp.Symbol]] = {}
    for s in survivors:
        info = solver.info[s]
        if s in names or info.kind == NEUTRAL:
            continue
        path, axis = _origin(info)
        key = (info.kind, info.value, _structural(path), axis, frozenset(places.get(s, ())))
        groups.setdefault(key, []).append(s)
    reps = {g[0]: g for g in groups.values()}

    widths = sorted(
        (s for s in reps if solver.info[s].kind == WIDTH),
        key=lambda s: (-sum(counts.get(m, 0) for m in reps[s]), solver.info[s].order),
    )
    for i, s in enumerate(widths):
        parts = _origin(solver.info[s])[0].split(".")
        if len(parts) > 1 and parts[-1] in ("weight", "bias"):
            parts = parts[:-1]
        # The module's own name; a list index (``net.2.weight``) names its list instead.
        leaf = next((p for p in reversed(parts) if not p.isdigit()), parts[-1])
        name = claim("d_model" if i == 0 else f"d_{leaf}")
        names.update(dict.fromkeys(reps[s], name))
    for s, members in reps.items():
        if s in names:
            continue
        info = solver.info[s]
        name = claim(info.hint or info.origin.split("[")[0].lstrip("_") + "_dim")
        names.update(dict.fromkeys(members, name))
    for s in survivors:
        if s not in names:
            names[s] = claim("n")
    return names


def infer_dims(gm: fx.GraphModule) -> PassResult:
    """Give every tensor axis a sympy expression; see the module docstring."""
    solver = DimSolver()
    propagator = Propagator(gm, solver)
    propagator.run()
    data = {s for e in propagator.export_syms.values() for s in solver.resolve(e).free_symbols}
    mapping = solver.rename(_display_names(gm, solver, data))
    for node in gm.graph.nodes:
        m = node.meta.get(meta.NAMESPACE, {})
        dims = m.get(meta.DIMS)
        if dims is None:
            continue
        if isinstance(dims, list):
            m[meta.DIMS] = [tuple(solver.resolve(e).xreplace(mapping) for e in t) for t in dims]
        else:
            m[meta.DIMS] = tuple(solver.resolve(e).xreplace(mapping) for e in dims)
    hidden = {str(solver.resolve(e).xreplace(mapping)) for e in propagator.hidden_outputs}
    solver.subs = {}  # node dims are now fully resolved and renamed
    g = meta.graph_meta(gm)
    g[meta.SOLVER] = solver
    if hidden:
        g.setdefault(meta.NOTES, []).append(
            f"the model returns hidden states: output dim {', '.join(sorted(hidden))} is a "
            "width that weights take as input, so it stays width-like (rules §1)"
        )
    return PassResult(gm, False)
