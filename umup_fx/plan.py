"""The plan: every per-parameter and per-branch fact the rewrite and the optimizer read.

Built once from the analysed graph (``build_plan``); ``transform`` rewrites from it and
``param_groups`` reads LR factors from it, so both always agree.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import sympy as sp
from torch import fx

from umup_fx import meta, rules
from umup_fx.hparams import HParams
from umup_fx.report import format_plan


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
    init_std: float | None = None  # "normal" with this std (muP's sigma); None: 1 (u-muP)
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
    # display name -> (kind, example value); kind "width" | "fixed" (model dims: vocab,
    # classes) | "data" (batch, sequence: any size)
    symbols: dict[str, tuple[str, int]]
    uncovered: list[tuple[str, str, str]]
    unknown_shape_ops: list[str] = field(default_factory=list)
    fp8_ops: list[tuple[str, str]] = field(default_factory=list)  # (node, weight)
    fp8_mode: str = "off"  # Options.fp8 of the transform ("off" for analyze)
    notes: list[str] = field(default_factory=list)  # decisions that change the model's numbers
    parametrization: str = "umup"  # or a baseline: "mup" | "sp" | "sp_emb_lr"

    def lr_factor(self, name: str) -> float:
        return self.params[name].lr_factor

    def __str__(self) -> str:
        return format_plan(self)


def build_plan(gm: fx.GraphModule, model_name: str = "model") -> Plan:
    """Collect the analysis passes' metadata into a ``Plan``."""
    g = meta.graph_meta(gm)
    solver, roles, infos = g[meta.SOLVER], g[meta.ROLES], g[meta.PARAMS]
    branches = g[meta.BRANCHES]
    _, depth = rules.stream_taus([b.kind for b in branches], [b.stream for b in branches],
                                 g.get(meta.HPARAMS) or HParams())
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
    # One entry per quantity: passes.dims already gave the per-block copies of a width
    # one symbol, so the fans above (and the copies plan.expand_blocks makes) use it.
    symbols = {
        str(s): ("data" if i.data else i.kind, i.value)
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
        notes=list(dict.fromkeys(g.get(meta.NOTES, []))),
    )


def _in_block(name: str, block: str) -> bool:
    return name.startswith(block + ".")


def _in_model_order(params: dict[str, ParamPlan], block_lists: list) -> dict[str, ParamPlan]:
    """Blocks in list order, each block's parameters as in its template, the rest where
    the captured model had them (the order ``named_parameters`` gives)."""
    names = list(params)
    keys: dict[str, tuple] = {}
    for b in block_lists:
        anchor = min((i for i, n in enumerate(names) if _in_block(n, b.block_path(0))),
                     default=None)
        if anchor is None:
            continue
        for k in range(len(b.names)):
            own, template = b.block_path(k), b.block_path(b.template[k])
            order = [n for n in names if _in_block(n, template)]
            for n in names:
                if _in_block(n, own):
                    keys[n] = (anchor, k, order.index(template + n[len(own):]))
    return {n: params[n] for n in sorted(names, key=lambda n: keys.get(n, (names.index(n), -1, 0)))}


def expand_blocks(plan: Plan, gm: fx.GraphModule, block_lists: list) -> dict[str, list[float]]:
    """Extend a plan made on a captured prefix of each block list to every block.

    Blocks past the prefix get the parameters (renamed) and residual branches of the
    kept block they share a graph with (``BlockList.template``); tau (rules §4), depth L
    and the depth-scaled LR factors are then computed over the whole model's branches.
    Updates the kept branches' tau in place (the rewrite reads them) and returns each
    block's taus in its branch order.
    """
    by_name = {n.name: n for n in gm.graph.nodes}
    kept_paths = [b.block_path(i) for b in block_lists for i in range(b.kept)]

    def region(branch: Any) -> str:
        stack = by_name[branch.add].meta.get("nn_module_stack") or {}
        for path, _ in stack.values():
            for p in kept_paths:
                if path == p or path.startswith(p + "."):
                    return p
        return ""

    for br in plan.branches:
        br.region = region(br)
    last_kept = {b.block_path(b.kept - 1): b for b in block_lists if b.kept}
    full: list[Any] = []
    for i, br in enumerate(plan.branches):
        full.append(br)
        ends_list = br.region in last_kept and (
            i + 1 == len(plan.branches) or plan.branches[i + 1].region != br.region
        )
        if not ends_list:
            continue
        blocks = last_kept[br.region]
        for k in range(blocks.kept, len(blocks.names)):
            src, dst = blocks.block_path(blocks.template[k]), blocks.block_path(k)
            for t in (b for b in plan.branches if b.region == src):
                full.append(
                    dataclasses.replace(
                        t, add=f"{dst}:{t.add}", skip=f"{dst}:{t.skip}", region=dst,
                        params=[dst + p[len(src):] for p in t.params],
                    )
                )
            for name, p in list(plan.params.items()):
                if _in_block(name, src):
                    new = dst + name[len(src):]
                    plan.params[new] = dataclasses.replace(
                        p, name=new,
                        aliases=tuple(dst + a[len(src):] if _in_block(a, src) else a
                                      for a in p.aliases),
                    )
    plan.params = _in_model_order(plan.params, block_lists)
    taus, plan.depth = rules.stream_taus([b.kind for b in full], [b.stream for b in full],
                                         plan.hparams)
    for i, (br, tau) in enumerate(zip(full, taus, strict=True)):
        br.index, br.tau = i, tau
    plan.branches = full
    for p in plan.params.values():
        p.lr_factor = rules.lr_factor(
            p.role, p.fan_in_value, p.fan_out_value, p.depth_scaled, plan.depth
        )
    per_block: dict[str, list[float]] = {}
    for br in full:
        if br.region:
            per_block.setdefault(br.region, []).append(br.tau)
    return per_block
