"""The dimension solver: sympy symbols for model dims, their kinds (fixed, width-like,
neutral helper) and values, and the substitutions that unify them; plus the small
shape helpers the per-op rules share. Used by ``dims`` (the pass) and ``shape_rules``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sympy as sp
import torch
from torch import fx

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


def fake_value(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def is_tensor(node: Any) -> bool:
    return isinstance(fake_value(node), torch.Tensor)


def shape_of(node: fx.Node) -> list[int]:
    return [size_hint(s) for s in fake_value(node).shape]



def flat_args(node: fx.Node) -> list[Any]:
    flat, _ = torch.utils._pytree.tree_flatten((node.args, node.kwargs))
    return flat


def broadcastable(src: list[int], dst: list[int]) -> bool:
    if len(src) > len(dst):
        return False
    return all(a in (1, b) for a, b in zip(reversed(src), reversed(dst), strict=False))


def arg_or(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def norm_axis(axis: int, ndim: int) -> int:
    return axis + ndim if axis < 0 else axis


