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

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sympy as sp
import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from umup_fx import meta

from ._graph import einsum_letters, is_grouped_mm, ops, source

aten = torch.ops.aten

FIXED, WIDTH, NEUTRAL = "fixed", "width", "neutral"
_ELIMINATION_RANK = {NEUTRAL: 0, WIDTH: 1, FIXED: 2}

Dims = tuple[sp.Expr, ...]


@dataclass
class SymbolInfo:
    kind: str  # FIXED | WIDTH | NEUTRAL
    value: int
    origin: str  # where the symbol was born, for naming and messages
    order: int
    hint: str | None = None  # a preferred display name ("vocab")
    data: bool = False  # a data dim (batch, sequence), not a model dim; set at naming


@dataclass
class DimSolver:
    """Symbols, their kinds and values, and the substitutions that unify them.

    ``equate`` keeps older, fixed and width symbols and eliminates neutral (helper)
    symbols first, so parameter dims stay in terms of readable model widths.
    """

    info: dict[sp.Symbol, SymbolInfo] = field(default_factory=dict)
    subs: dict[sp.Symbol, sp.Expr] = field(default_factory=dict)
    unknown_ops: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)

    def new(self, kind: str, value: int, origin: str, hint: str | None = None) -> sp.Symbol:
        sym = sp.Symbol(f"_{kind[0]}{len(self.info)}", positive=True)
        self.info[sym] = SymbolInfo(kind, int(value), origin, len(self.info), hint)
        return sym

    def resolve(self, expr: sp.Expr) -> sp.Expr:
        expr = sp.sympify(expr)
        if not self.subs or not (expr.free_symbols & self.subs.keys()):
            return expr
        return expr.xreplace(self.subs)

    def value(self, expr: sp.Expr) -> int:
        expr = self.resolve(expr)
        return int(expr.xreplace({s: self.info[s].value for s in expr.free_symbols}))

    def kind_of(self, expr: sp.Expr) -> str:
        """WIDTH if any width symbol remains, else FIXED (constants are fixed)."""
        syms = self.resolve(expr).free_symbols
        if any(self.info[s].kind == WIDTH for s in syms):
            return WIDTH
        return FIXED

    def mark_fixed(self, expr: sp.Expr, hint: str | None = None) -> None:
        for s in self.resolve(expr).free_symbols:
            self.info[s].kind = FIXED
            if hint and self.info[s].hint is None:
                self.info[s].hint = hint

    def equate(self, a: sp.Expr, b: sp.Expr, where: str = "") -> None:
        a, b = self.resolve(a), self.resolve(b)
        if a == b:
            return
        diff = a - b
        if diff == 0:
            return
        options = []
        for sym in diff.free_symbols:
            solutions = _solve(diff, sym)
            if len(solutions) == 1:
                # Keep fixed and old symbols; prefer solutions without division
                # (d_qkv = 3*d_attn reads better than d_attn = d_qkv/3).
                divides = any(
                    e.is_negative for _, e in (t.as_base_exp() for t in sp.Mul.make_args(solutions[0]))
                ) or any(not r.is_integer for r in solutions[0].atoms(sp.Rational))
                info = self.info[sym]
                options.append(((_ELIMINATION_RANK[info.kind], divides, -info.order), sym, solutions[0]))
        if options:
            _, sym, solution = min(options, key=lambda o: o[0])
            self._eliminate(sym, solution)
            return
        candidates = list(diff.free_symbols)
        if not candidates or self.value(a) != self.value(b):
            self.conflicts.append(f"{where}: {a} != {b}")

    def _eliminate(self, sym: sp.Symbol, expr: sp.Expr) -> None:
        # A fixed symbol merged into a width one makes the class fixed (rules §1).
        if self.info[sym].kind == FIXED:
            for s in expr.free_symbols:
                if self.info[s].kind != FIXED:
                    self.info[s].kind = FIXED
                    self.info[s].hint = self.info[s].hint or self.info[sym].hint
        self.subs = {k: v.xreplace({sym: expr}) for k, v in self.subs.items()}
        self.subs[sym] = expr

    def rename(self, names: dict[sp.Symbol, str]) -> dict[sp.Symbol, sp.Symbol]:
        """Give surviving symbols display names; returns the old -> new map.

        Symbols given the same name become one symbol (the oldest one's info is kept):
        that is how ``_display_names`` unifies the per-block copies of one width.
        """
        mapping = {s: sp.Symbol(n, positive=True) for s, n in names.items()}
        info: dict[sp.Symbol, SymbolInfo] = {}
        for s, i in sorted(self.info.items(), key=lambda kv: kv[1].order):
            info.setdefault(mapping.get(s, s), i)
        self.info = info
        self.subs = {k: v.xreplace(mapping) for k, v in self.subs.items()}
        return mapping


def _solve(diff: sp.Expr, sym: sp.Symbol) -> list[sp.Expr]:
    """``sp.solve(diff, sym)``, short-cut for the equations shapes give: linear in ``sym``
    (``k*sym + rest``, ``k`` free of ``sym``) solves to ``-rest/k`` without sympy's
    general solver, which dominated analysis time."""
    if any(sym in f.free_symbols for f in diff.atoms(sp.Function)):
        return []  # inside a strided shape (export's FloorDiv): not solvable for it
    k = diff.diff(sym)
    if k != 0 and sym not in k.free_symbols:
        return [-diff.xreplace({sym: 0}) / k]
    try:
        return sp.solve(diff, sym)
    except NotImplementedError:  # sympy has no algorithm for it: leave the dims apart
        return []


def size_hint(size: Any) -> int:
    """The example value of a (possibly symbolic) size."""
    if isinstance(size, int):
        return size
    node = size.node
    if node.hint is not None:
        return int(node.hint)
    return int(node.shape_env.size_hint(node.expr))


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _is_tensor(node: Any) -> bool:
    return isinstance(_val(node), torch.Tensor)


def _shape(node: fx.Node) -> list[int]:
    return [size_hint(s) for s in _val(node).shape]


class _Propagator:
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
        sizes = _shape(node) if sizes is None else sizes
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
        shape = _shape(node)
        out: list[sp.Expr | None] = [sp.Integer(1) if n == 1 else None for n in shape]
        for t in inputs:
            if not _is_tensor(t):
                continue
            tdims, tshape = self.d(t), _shape(t)
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
            val = _val(node)
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
        if not _is_tensor(node) or not node.users:
            return None
        kind = meta.get(node, meta.KIND, "input")
        if kind == "param":
            name = meta.get(node, meta.PARAM)
            # A size-1 axis (a cls token's [1, 1, d]) is a broadcast axis, never a width.
            return tuple(
                sp.Integer(1) if n == 1 else self.s.new(WIDTH, n, f"{name}[{i}]")
                for i, n in enumerate(_shape(node))
            )
        if kind == "input":
            return tuple(
                sp.Integer(1) if n == 1 else self.s.new(FIXED, n, f"{node.name}[{i}]")
                for i, n in enumerate(_shape(node))
            )
        return self.fresh(node)

    def outputs(self, node: fx.Node) -> None:
        """Output dims are fixed (rules §1), except a width some weight op takes as its
        input features: the model returns hidden states (a backbone without a head, or
        T5's encoder states next to its logits), and that width still grows."""
        contracted = {self.s.resolve(e) for e in self.contracted}
        flat, _ = torch.utils._pytree.tree_flatten(node.args[0])
        for t in flat:
            if _is_tensor(t) and self.d(t) is not None:
                for e in self.d(t):
                    e = self.s.resolve(e)
                    if e in contracted and self.s.kind_of(e) == WIDTH:
                        self.hidden_outputs.append(e)
                    else:
                        self.s.mark_fixed(e, "out")

    def tensor_op(self, node: fx.Node) -> Dims:
        rule = _RULES.get(node.target) if node.op == "call_function" else None
        if is_grouped_mm(node.target):
            rule = _grouped_mm
        if rule is not None:
            return rule(self, node)
        inputs = [a for a in _flat_args(node) if _is_tensor(a)]
        shape = _shape(node)
        if inputs and all(_broadcastable(_shape(t), shape) for t in inputs):
            return self.broadcast(node, inputs)
        self.s.unknown_ops.append(f"{node.name} ({_op_name(node)})")
        return self.fresh(node)

    def multi_op(self, node: fx.Node) -> list[Dims]:
        rule = _MULTI_RULES.get(node.target)
        if rule is not None:
            return rule(self, node)
        self.s.unknown_ops.append(f"{node.name} ({_op_name(node)})")
        return [
            self.fresh(node, sizes=[size_hint(n) for n in v.shape])
            if isinstance(v, torch.Tensor)
            else ()
            for v in _val(node)
        ]


def _flat_args(node: fx.Node) -> list[Any]:
    flat, _ = torch.utils._pytree.tree_flatten((node.args, node.kwargs))
    return flat


def _broadcastable(src: list[int], dst: list[int]) -> bool:
    if len(src) > len(dst):
        return False
    return all(a in (1, b) for a, b in zip(reversed(src), reversed(dst), strict=False))


def _op_name(node: fx.Node) -> str:
    t = node.target
    return str(t) if not callable(t) else getattr(t, "__name__", str(t))


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _norm_axis(axis: int, ndim: int) -> int:
    return axis + ndim if axis < 0 else axis


# -- shape rules, one per op family -------------------------------------------------
Rule = Callable[[_Propagator, fx.Node], Any]
_CONVOLUTION = ops("convolution")


def _linear(p: _Propagator, n: fx.Node) -> Dims:
    x, w = n.args[0], n.args[1]
    b = _arg(n, 2, "bias")
    xd, wd = p.d(x), p.d(w)
    p.s.equate(xd[-1], wd[1], n.name)
    p.contracted.append(wd[1])
    if isinstance(b, fx.Node):
        p.s.equate(p.d(b)[-1], wd[0], n.name)
    return xd[:-1] + (wd[0],)


def _matmul_dims(p: _Propagator, n: fx.Node, a: fx.Node, b: fx.Node) -> Dims:
    ad, bd = p.d(a), p.d(b)
    a2 = ad if len(ad) > 1 else (sp.Integer(1),) + ad
    b2 = bd if len(bd) > 1 else bd + (sp.Integer(1),)
    p.s.equate(a2[-1], b2[-2], n.name)
    batch_a, batch_b = a2[:-2], b2[:-2]
    shape = _shape(n)
    nbatch = len(shape) - (len(ad) > 1) - (len(bd) > 1)
    batch: list[sp.Expr] = []
    for k in range(nbatch, 0, -1):
        cand = [bt[-k] for bt in (batch_a, batch_b) if len(bt) >= k and bt[-k] != 1]
        for c in cand[1:]:
            p.s.equate(cand[0], c, n.name)
        batch.append(cand[0] if cand else sp.Integer(1))
    out = tuple(batch)
    if len(ad) > 1:
        out += (a2[-2],)
    if len(bd) > 1:
        out += (b2[-1],)
    return out


def _contract_weight(p: _Propagator, w: Any) -> None:
    if meta.get(source(w), meta.KIND) == "param":
        p.contracted.append(p.d(w)[-2])


def _mm(p: _Propagator, n: fx.Node) -> Dims:
    _contract_weight(p, n.args[1])
    return _matmul_dims(p, n, n.args[0], n.args[1])


def _addmm(p: _Propagator, n: fx.Node) -> Dims:
    _contract_weight(p, n.args[2])
    out = _matmul_dims(p, n, n.args[1], n.args[2])
    bias = n.args[0]
    if _is_tensor(bias):
        bd = p.d(bias)
        for k in range(1, len(bd) + 1):
            if bd[-k] != 1:
                p.s.equate(bd[-k], out[-k], n.name)
    return out


def _grouped_mm(p: _Propagator, n: fx.Node) -> Dims:
    """x[S, in] @ W[E, in, out] by expert slices of x: [S, out]. E counts experts (fixed);
    a 3-D x[E, S, in] (no offsets) is one batch of S rows per expert."""
    xd, wd = p.d(n.args[0]), p.d(n.args[1])
    p.s.equate(xd[-1], wd[-2], n.name)
    p.s.mark_fixed(wd[0], "experts")
    _contract_weight(p, n.args[1])
    if len(xd) == 3:
        p.s.equate(xd[0], wd[0], n.name)
    return xd[:-1] + (wd[-1],)


def _baddbmm(p: _Propagator, n: fx.Node) -> Dims:
    return _matmul_dims(p, n, n.args[1], n.args[2])


def _embedding(p: _Propagator, n: fx.Node) -> Dims:
    w, idx = n.args[0], n.args[1]
    wd = p.d(w)
    p.s.mark_fixed(wd[0], "vocab")
    return p.d(idx) + (wd[1],)


def _reshape(p: _Propagator, n: fx.Node) -> Dims:
    """Group input and output axes by equal products of sizes, then tie each group."""
    src, dst = p.d(n.args[0]), _shape(n)
    src_sizes = _shape(n.args[0])
    out: list[sp.Expr] = []
    i = j = 0
    while i < len(src) or j < len(dst):
        gi, gj = [], []
        pi = pj = 1
        # Size-1 axes stand alone.
        if i < len(src) and src_sizes[i] == 1 and (j >= len(dst) or dst[j] != 1):
            i += 1
            continue
        if j < len(dst) and dst[j] == 1 and (i >= len(src) or src_sizes[i] != 1):
            out.append(sp.Integer(1))
            j += 1
            continue
        while True:
            if pi <= pj and i < len(src):
                gi.append(i)
                pi *= src_sizes[i]
                i += 1
            elif j < len(dst):
                gj.append(j)
                pj *= dst[j]
                j += 1
            else:
                break
            if pi == pj and gi and gj:
                break
        total = sp.Mul(*[src[k] for k in gi]) if gi else sp.Integer(1)
        if len(gj) == 1:
            out.append(total)
            continue
        lead = [p.s.new(NEUTRAL, dst[k], f"{n.name}[{k}]") for k in gj[:-1]]
        out.extend(lead)
        out.append(total / sp.Mul(*lead))
    return tuple(out)


def _expand(p: _Propagator, n: fx.Node) -> Dims:
    src, ssz, dst = p.d(n.args[0]), _shape(n.args[0]), _shape(n)
    out: list[sp.Expr] = []
    offset = len(dst) - len(src)
    for k, size in enumerate(dst):
        j = k - offset
        if j >= 0 and ssz[j] == size:
            out.append(src[j])
        else:
            out.append(p.s.new(NEUTRAL, size, f"{n.name}[{k}]"))
    return tuple(out)


def _transpose(p: _Propagator, n: fx.Node) -> Dims:
    d = list(p.d(n.args[0]))
    if len(d) < 2:
        return tuple(d)
    a = _norm_axis(n.args[1], len(d)) if len(n.args) > 1 else 0
    b = _norm_axis(n.args[2], len(d)) if len(n.args) > 2 else 1
    d[a], d[b] = d[b], d[a]
    return tuple(d)


def _permute(p: _Propagator, n: fx.Node) -> Dims:
    d = p.d(n.args[0])
    return tuple(d[_norm_axis(k, len(d))] for k in n.args[1])


def _unsqueeze(p: _Propagator, n: fx.Node) -> Dims:
    d = list(p.d(n.args[0]))
    d.insert(_norm_axis(n.args[1], len(d) + 1), sp.Integer(1))
    return tuple(d)


def _squeeze(p: _Propagator, n: fx.Node) -> Dims:
    d, sizes = p.d(n.args[0]), _shape(n.args[0])
    if len(n.args) > 1:
        axes = n.args[1] if isinstance(n.args[1], (list, tuple)) else [n.args[1]]
        axes = {_norm_axis(a, len(d)) for a in axes}
    else:
        axes = set(range(len(d)))
    return tuple(e for k, e in enumerate(d) if not (k in axes and sizes[k] == 1))


def _part(p: _Propagator, n: fx.Node, whole: sp.Expr, total: int, part: int) -> sp.Expr:
    if part == total:
        return whole
    return whole * sp.Rational(part, total)


def _slice(p: _Propagator, n: fx.Node) -> Dims:
    d = list(p.d(n.args[0]))
    axis = _norm_axis(_arg(n, 1, "dim", 0), len(d))
    total, part = _shape(n.args[0])[axis], _shape(n)[axis]
    d[axis] = _part(p, n, d[axis], total, part)
    return tuple(d)


def _select(p: _Propagator, n: fx.Node) -> Dims:
    d = list(p.d(n.args[0]))
    del d[_norm_axis(n.args[1], len(d))]
    return tuple(d)


def _reduce(p: _Propagator, n: fx.Node) -> Dims:
    d = p.d(n.args[0])
    axes = _arg(n, 1, "dim")
    keep = bool(_arg(n, 2, "keepdim", False))
    if axes is None:
        return ()
    axes = {_norm_axis(a, len(d)) for a in (axes if isinstance(axes, (list, tuple)) else [axes])}
    if keep:
        return tuple(sp.Integer(1) if k in axes else e for k, e in enumerate(d))
    return tuple(e for k, e in enumerate(d) if k not in axes)


def _full_reduce(p: _Propagator, n: fx.Node) -> Dims:
    return ()


def _cat(p: _Propagator, n: fx.Node) -> Dims:
    tensors = [t for t in n.args[0] if _is_tensor(t) and _shape(t) != [0]]
    axis = _norm_axis(_arg(n, 1, "dim", 0), len(_shape(n)))
    first = list(p.d(tensors[0]))
    for t in tensors[1:]:
        for k, e in enumerate(p.d(t)):
            if k != axis:
                p.s.equate(first[k], e, n.name)
    first[axis] = sp.Add(*[p.d(t)[axis] for t in tensors])
    return tuple(first)


def _stack(p: _Propagator, n: fx.Node) -> Dims:
    tensors = list(n.args[0])
    first = list(p.d(tensors[0]))
    for t in tensors[1:]:
        for a, b in zip(first, p.d(t), strict=False):
            p.s.equate(a, b, n.name)
    first.insert(_norm_axis(_arg(n, 1, "dim", 0), len(first) + 1), sp.Integer(len(tensors)))
    return tuple(first)


def _sdpa(p: _Propagator, n: fx.Node) -> Dims:
    q, k, v = (p.d(a) for a in n.args[:3])
    p.s.equate(q[-1], k[-1], n.name)
    p.s.equate(k[-2], v[-2], n.name)
    qs, vs = _shape(n.args[0]), _shape(n.args[2])
    for i in range(len(q) - 2):  # batch / head axes (GQA: kv heads may differ)
        if qs[i] == vs[i]:
            p.s.equate(q[i], v[i], n.name)
    return q[:-1] + (v[-1],)


def _norm_affine(p: _Propagator, n: fx.Node, affine: tuple[Any, ...]) -> Dims:
    """A norm's output is its input; its gain / bias match the trailing axes."""
    x = p.d(n.args[0])
    for t in affine:
        if _is_tensor(t):
            td = p.d(t)
            for k in range(1, len(td) + 1):
                p.s.equate(td[-k], x[-k], n.name)
    return x


def _layer_norm(p: _Propagator, n: fx.Node) -> Dims:
    return _norm_affine(p, n, (_arg(n, 2, "weight"), _arg(n, 3, "bias")))


def _rms_norm(p: _Propagator, n: fx.Node) -> Dims:
    return _norm_affine(p, n, (_arg(n, 2, "weight"),))


def _cross_entropy(p: _Propagator, n: fx.Node) -> Dims:
    logits, target = p.d(n.args[0]), p.d(n.args[1])
    p.s.mark_fixed(logits[1 if len(logits) > 1 else 0], "classes")
    reduction = _arg(n, 3, "reduction", 1)
    return target if reduction == 0 else ()


def _spatial(p: _Propagator, n: fx.Node, x: Dims, first: int) -> Dims:
    """Spatial output axes from ``first`` on: the input's dim when the size is kept, else a
    new fixed dim (kernel, stride and padding are data-side numbers, never widths)."""
    xs, shape = _shape(n.args[0]), _shape(n)
    out = []
    for k in range(first, len(shape)):
        same = k < len(xs) and xs[k] == shape[k]
        out.append(x[k] if same else p.s.new(FIXED, shape[k], f"{n.name}[{k}]", "spatial"))
    return tuple(out)


def _conv(p: _Propagator, n: fx.Node) -> Dims:
    """conv{1,2,3}d / convolution: x[C_in] = W[1] * groups, out[C] = W[0], kernels fixed."""
    x, w = p.d(n.args[0]), p.d(n.args[1])
    kernel = len(w) - 2
    channel = len(x) - kernel - 1  # 1 batched, 0 unbatched
    groups = _arg(n, 8 if n.target in _CONVOLUTION else 6, "groups", 1)
    p.s.equate(x[channel], w[1] * groups, n.name)
    for e in w[2:]:
        p.s.mark_fixed(e, "kernel")
    bias = _arg(n, 2, "bias")
    if isinstance(bias, fx.Node):
        p.s.equate(p.d(bias)[0], w[0], n.name)
    return x[:channel] + (w[0],) + _spatial(p, n, x, channel + 1)


def _pool(p: _Propagator, n: fx.Node) -> Dims:
    """Pooling keeps batch and channel axes; spatial axes as ``_spatial``."""
    x = p.d(n.args[0])
    ndim = len(_shape(n))
    first = ndim - int(n.target._opname[-2])  # avg_pool2d: 2 spatial axes
    return x[:first] + _spatial(p, n, x, first)


def _batch_norm(p: _Propagator, n: fx.Node) -> Dims:
    """batch_norm / group_norm: affine parameters (and statistics) per channel (axis 1)."""
    x = p.d(n.args[0])
    for t in n.args[1:5]:
        if _is_tensor(t):
            p.s.equate(p.d(t)[0], x[1], n.name)
    return x


def _index(p: _Propagator, n: fx.Node) -> Dims:
    """x[..., idx, ...] with one index tensor: its axis becomes the index's axes; a
    parameter indexed on its rows by integers is a table (rows fixed, as embedding)."""
    x, indices = p.d(n.args[0]), list(n.args[1])
    tensors = [k for k, t in enumerate(indices) if t is not None]
    if len(tensors) != 1 or not _is_tensor(indices[tensors[0]]):
        return p.fresh(n)
    k, idx = tensors[0], indices[tensors[0]]
    if k == 0 and meta.get(source(n.args[0]), meta.KIND) == "param" and not _val(idx).is_floating_point():
        p.s.mark_fixed(x[0], "vocab")
    return x[:k] + p.d(idx) + x[k + 1:]


def _einsum(p: _Propagator, n: fx.Node) -> Dims:
    """Subscripts name dims: each letter is one dim across operands and output."""
    parsed = einsum_letters(n.args[0])
    operands = list(n.args[1])
    if parsed is None or len(parsed[0]) != len(operands):
        return p.fresh(n)
    letters: dict[str, sp.Expr] = {}
    for subs, t in zip(parsed[0], operands, strict=True):
        for letter, e in zip(subs, p.d(t), strict=True):
            if letter in letters:
                p.s.equate(letters[letter], e, n.name)
            else:
                letters[letter] = e
    return tuple(letters[letter] for letter in parsed[1])


def _index_add(p: _Propagator, n: fx.Node) -> Dims:
    """self.index_add(dim, index, source): self's dims; source's other axes match them."""
    d, src = p.d(n.args[0]), p.d(n.args[3])
    axis = _norm_axis(n.args[1], len(d))
    for i, (a, b) in enumerate(zip(d, src, strict=True)):
        if i != axis:
            p.s.equate(a, b, n.name)
    return d


def _one_hot(p: _Propagator, n: fx.Node) -> Dims:
    """One-hot codes of integers: the classes axis is a fixed count (a router's experts)."""
    classes = p.s.new(FIXED, size_hint(_val(n).shape[-1]), f"{n.name}.classes")
    return p.d(n.args[0]) + (classes,)


def _factory(p: _Propagator, n: fx.Node) -> Dims:
    return p.fresh(n)


def _split(p: _Propagator, n: fx.Node) -> list[Dims]:
    d = p.d(n.args[0])
    axis = _norm_axis(_arg(n, 2, "dim", 0), len(d))
    total = _shape(n.args[0])[axis]
    out = []
    for v in _val(n):
        dims = list(d)
        dims[axis] = _part(p, n, d[axis], total, size_hint(v.shape[axis]))
        out.append(tuple(dims))
    return out


def _unbind(p: _Propagator, n: fx.Node) -> list[Dims]:
    d = list(p.d(n.args[0]))
    del d[_norm_axis(_arg(n, 1, "dim", 0), len(d))]
    return [tuple(d) for _ in _val(n)]


def _topk(p: _Propagator, n: fx.Node) -> list[Dims]:
    """values and indices of the k largest along an axis: that axis is a set of choices
    (a router's experts), a fixed count, never a width; k is a new fixed dim."""
    d = list(p.d(n.args[0]))
    axis = _norm_axis(_arg(n, 2, "dim", -1), len(d))
    p.s.mark_fixed(d[axis], "experts")
    d[axis] = p.s.new(FIXED, size_hint(_val(n)[0].shape[axis]), f"{n.name}.k")
    return [tuple(d), tuple(d)]


def _native_layer_norm(p: _Propagator, n: fx.Node) -> list[Dims]:
    x = _layer_norm(p, n)
    stats = tuple(x[: len(x) - len(n.args[1])]) + (sp.Integer(1),) * len(n.args[1])
    return [x, stats, stats]


def _native_dropout(p: _Propagator, n: fx.Node) -> list[Dims]:
    x = p.d(n.args[0])
    return [x, x]


def _getitem(p: _Propagator, n: fx.Node) -> Dims:
    return p.d(n.args[0])[n.args[1]]


def _same(p: _Propagator, n: fx.Node) -> Dims:
    return p.d(n.args[0])


def _table(entries: list[tuple[set[Any] | list[Any], Any]]) -> dict[Any, Any]:
    """{op overload: rule} from (overloads, rule) rows."""
    return {target: rule for targets, rule in entries for target in targets}


_RULES: dict[Any, Rule] = _table([
    (ops("linear"), _linear),
    (ops("mm", "bmm", "matmul"), _mm),
    (ops("addmm"), _addmm),
    (ops("baddbmm"), _baddbmm),
    (ops("embedding"), _embedding),
    (ops("view", "reshape", "_unsafe_view", "view_copy", "flatten.using_ints", "unflatten.int"), _reshape),
    (ops("expand", "expand_copy"), _expand),
    (ops("transpose.int", "t", "numpy_T"), _transpose),
    (ops("permute"), _permute),
    (ops("unsqueeze"), _unsqueeze),
    (ops("squeeze", "squeeze.dim", "squeeze.dims"), _squeeze),
    (ops("slice.Tensor", "narrow"), _slice),
    (ops("select.int"), _select),
    (
        ops(
            "mean.dim", "sum.dim_IntList", "amax", "amin", "var.correction", "std.correction",
            "var.dim", "std.dim", "logsumexp", "norm.ScalarOpt_dim", "linalg_vector_norm",
        ),
        _reduce,
    ),
    (ops("mean", "sum", "max", "min"), _full_reduce),
    (ops("cat"), _cat),
    (ops("stack"), _stack),
    (ops("scaled_dot_product_attention"), _sdpa),
    (ops("layer_norm"), _layer_norm),
    (ops("batch_norm", "group_norm"), _batch_norm),
    (ops("conv1d", "conv2d", "conv3d", "conv1d.padding", "conv2d.padding", "conv3d.padding",
         "convolution"), _conv),
    (ops("avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
         "adaptive_avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d"), _pool),
    (ops("index.Tensor"), _index),
    (ops("einsum"), _einsum),
    (ops("index_add", "index_add_"), _index_add),
    (ops("one_hot"), _one_hot),
    (ops("rms_norm"), _rms_norm),
    (ops("cross_entropy_loss", "nll_loss", "nll_loss_nd"), _cross_entropy),
    (
        ops(
            "arange", "arange.start", "arange.start_step", "zeros", "ones", "full", "empty.memory_format",
            "rand", "randn", "scalar_tensor", "tensor", "ones_like", "zeros_like", "full_like",
            "empty_like",
        ),
        _factory,
    ),
    ([operator.getitem], _getitem),
    (ops("clone", "alias", "detach", "contiguous", "_to_copy", "to.dtype", "lift_fresh_copy"), _same),
])

_MULTI_RULES: dict[Any, Callable[[_Propagator, fx.Node], list[Dims]]] = _table([
    (ops("split.Tensor", "split_with_sizes", "chunk", "tensor_split.sections"), _split),
    (ops("unbind.int"), _unbind),
    (ops("native_layer_norm"), _native_layer_norm),
    (ops("native_dropout"), _native_dropout),
    (ops("topk"), _topk),
])


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
      has) are named ``batch`` / ``seq`` and flagged ``SymbolInfo.data``.
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
    for s in survivors:
        info = solver.info[s]
        path, axis = _origin(info)
        from_input = path in inputs and s not in places
        if info.kind == FIXED and (s in data_syms or from_input):
            info.data = True
            if path in inputs and axis is not None:
                base = ("batch", "seq")[axis] if axis < 2 else f"{path}_{axis}"
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
    propagator = _Propagator(gm, solver)
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
