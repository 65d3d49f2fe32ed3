"""The plan: every per-parameter and per-branch fact the rewrite and the optimizer read.

Built once from the analysed graph (``build_plan``); ``transform`` rewrites from it and
``param_groups`` reads LR factors from it, so both always agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp
from torch import fx

from . import meta, rules
from .hparams import HParams


@dataclass
class ParamPlan:
    """What u-muP does with one parameter."""

    name: str
    shape: tuple[int, ...]
    role: str
    fan_in: sp.Expr | None
    fan_out: sp.Expr | None
    fan_in_value: int | None
    fan_out_value: int | None
    depth_scaled: bool
    fp8: bool
    lr_factor: float
    uses: list = field(default_factory=list)  # [passes.roles.Use]
    aliases: tuple[str, ...] = ()
    trainable: bool = True
    init: str = "keep"  # rules §2: "normal" | "zeros" | "ones" | "keep"
    frozen_by_umup: bool = False  # a norm parameter made non-parametric (§2)

    @property
    def lr_rule(self) -> str:
        return rules.lr_rule_text(self.role, self.depth_scaled)


@dataclass
class Plan:
    """The result of ``umup_fx.analyze``; ``str(plan)`` is the readable report."""

    model_name: str
    params: dict[str, ParamPlan]
    branches: list  # [passes.residuals.Branch]
    depth: int
    hparams: HParams
    symbols: dict[str, tuple[str, int]]  # display name -> (kind, example value)
    uncovered: list[tuple[str, str, str]]
    unknown_shape_ops: list[str] = field(default_factory=list)
    fp8_ops: list[tuple[str, str]] = field(default_factory=list)  # (node, weight)
    fp8_mode: str = "off"  # Options.fp8 of the transform ("off" for analyze)

    def lr_factor(self, name: str) -> float:
        return self.params[name].lr_factor

    def __str__(self) -> str:
        from .report import format_plan

        return format_plan(self)


def build_plan(gm: fx.GraphModule, model_name: str = "model") -> Plan:
    """Collect the analysis passes' metadata into a ``Plan``."""
    g = meta.graph_meta(gm)
    solver, roles, infos = g[meta.SOLVER], g[meta.ROLES], g[meta.PARAMS]
    branches = g[meta.BRANCHES]
    depth = rules.depth_of([b.kind for b in branches])
    fp8_ops = [
        (n.name, meta.get(n, meta.WEIGHT)) for n in gm.graph.nodes if meta.get(n, meta.FP8)
    ]
    fp8_weights = {w for _, w in fp8_ops}
    params = {}
    for name, info in infos.items():
        r = roles[name]
        fin = solver.value(r.fan_in) if r.fan_in is not None else None
        fout = solver.value(r.fan_out) if r.fan_out is not None else None
        scaled = name in g[meta.DEPTH_SCALED]
        params[name] = ParamPlan(
            name=name,
            shape=info.shape,
            role=r.role,
            fan_in=r.fan_in,
            fan_out=r.fan_out,
            fan_in_value=fin,
            fan_out_value=fout,
            depth_scaled=scaled,
            fp8=name in fp8_weights,
            lr_factor=rules.lr_factor(r.role, fin, fout, scaled, depth),
            uses=list(r.uses),
            aliases=info.aliases,
            trainable=info.requires_grad,
            init=rules.init_of(r.role, r.shift),
        )
    symbols = {
        str(s): (i.kind, i.value)
        for s, i in solver.info.items()
        if not str(s).startswith("_") and i.kind != "neutral"
    }
    return Plan(
        model_name=model_name,
        params=params,
        branches=list(branches),
        depth=depth,
        hparams=g.get(meta.HPARAMS) or HParams(),
        symbols=symbols,
        uncovered=list(g[meta.UNCOVERED]),
        unknown_shape_ops=list(solver.unknown_ops),
        fp8_ops=fp8_ops,
    )
