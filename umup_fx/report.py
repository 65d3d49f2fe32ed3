"""Readable reports: the plan as a table (``str(plan)``, ``umup_fx.explain``), and
``draw``, a picture of a rewritten graph.

The table is short: a parameter of every block with the same role, fans, LR and FP8
flag is one row (``layers.{0..31}.attn.q_proj.weight``), residual branches are one row
per kind. The ``Plan`` keeps every parameter and branch (``plan.params``,
``plan.branches``).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sympy as sp
import torch

from umup_fx import meta
from umup_fx.errors import UmupError

if TYPE_CHECKING:
    from umup_fx.plan import Plan

# A parameter row is grouped over blocks when at least this many blocks share it.
GROUP_MIN = 3


def _fan(expr: sp.Expr | None, value: int | None) -> str:
    if expr is None:
        return "-"
    text = str(expr).replace("**", "^")
    return text if text == str(value) else f"{text}={value}"


def _table(rows: list[list[str]], header: list[str]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*header).rstrip(), fmt.format(*("-" * w for w in widths)).rstrip()] + [
        fmt.format(*r).rstrip() for r in rows
    ]


def _index_set(indices: list[int]) -> str:
    """``{0..3}``, ``{0,2,4}``, ``{0..3,8..11}``."""
    idx = sorted(set(indices))
    runs: list[list[int]] = []
    for i in idx:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    parts = [f"{r[0]}..{r[-1]}" if len(r) > 2 else ",".join(map(str, r)) for r in runs]
    return "{" + ",".join(parts) + "}"


_INDEX = re.compile(r"(?:(?<=\.)|^)(\d+)(?=\.|$)")


def _group(rows: list[tuple[str, list[str]]]) -> list[tuple[str, list[str]]]:
    """Merge rows whose names differ in their first list index only and whose cells are
    equal, when ``GROUP_MIN`` or more do; the merged row sits where its first one was."""
    groups: dict[tuple, list[tuple[int, str]]] = {}
    for name, cells in rows:
        m = _INDEX.search(name)
        key = (name[: m.start()], name[m.end():], *cells) if m else (name, *cells)
        groups.setdefault(key, []).append((int(m.group(1)) if m else -1, name))
    out: list[tuple[str, list[str]]] = []
    for name, cells in rows:
        m = _INDEX.search(name)
        if not m:
            out.append((name, cells))
            continue
        members = groups[(name[: m.start()], name[m.end():], *cells)]
        if len(members) < GROUP_MIN:
            out.append((name, cells))
        elif members[0][1] == name:
            label = name[: m.start()] + _index_set([i for i, _ in members]) + name[m.end():]
            out.append((label, cells))
    return out


def _fp8_path(mode: str) -> str:
    """Which FP8 path runs, for ``Options.fp8`` ``mode``; for "auto", on this machine."""
    if mode == "simulate":
        return "path simulate: cast to FP8 and back, matmul in the model's dtype"
    if mode == "scaled_mm":
        return "path scaled_mm: real FP8 tensor-core matmuls (torch._scaled_mm, CUDA sm_89+)"
    from umup_fx.runtime.fp8 import has_fp8_matmul

    if not torch.cuda.is_available():
        return ("path auto -> simulated on this machine (no CUDA GPU; real torch._scaled_mm "
                "needs CUDA sm_89+)")
    dev = torch.device("cuda", torch.cuda.current_device())
    sm = "sm_{}{}".format(*torch.cuda.get_device_capability(dev))
    if has_fp8_matmul(dev):
        return (f"path auto -> real torch._scaled_mm on this machine's GPU ({sm}) for CUDA "
                "tensors whose dims are multiples of 16; simulated otherwise")
    return f"path auto -> simulated on this machine (GPU is {sm}; torch._scaled_mm needs sm_89+)"


def _param_rows(plan: Plan) -> list[tuple[str, list[str]]]:
    rows = []
    for p in plan.params.values():
        role = p.role
        if len(p.uses) > 1:
            role += " [tied: " + ", ".join(u.role for u in p.uses) + "]"
        lr = f"{p.lr_rule} = eta*{p.lr_factor:.4g}" if p.trainable else "frozen"
        rows.append((p.name, [
            "x".join(map(str, p.shape)),
            role,
            _fan(p.fan_in, p.fan_in_value),
            _fan(p.fan_out, p.fan_out_value),
            lr,
            "yes" if p.fp8 else "-",
        ]))
    return rows


def _lr_lines(plan: Plan) -> list[str]:
    """What eta is, and the learning rate of each optimizer group at the default eta."""
    from umup_fx.runtime.optim import DEFAULT_LR

    eta = DEFAULT_LR[plan.parametrization]
    groups: dict[float, int] = {}
    for p in plan.params.values():
        if p.trainable:
            groups[p.lr_factor] = groups.get(p.lr_factor, 0) + 1
    rates = ", ".join(f"{eta * f:.4g} ({n} param{'s' * (n > 1)})"
                      for f, n in sorted(groups.items(), reverse=True))
    return [f"LR: eta x factor; eta is the optimizer's lr, umup_fx.AdamW's default "
            f"2^{math.log2(eta):g} = {eta:g} here (docs/transfer.md)",
            f"  learning rates at that eta, one optimizer group each: {rates or '-'}"]


def _branch_rows(plan: Plan) -> list[list[str]]:
    kinds: dict[str, list[Any]] = {}
    for b in plan.branches:
        kinds.setdefault(b.kind, []).append(b)
    rows = []
    for kind, bs in kinds.items():
        taus = [f"{b.tau:.4g}" for b in bs]
        tau = taus[0] if len(bs) == 1 else (
            ", ".join(taus) if len(bs) <= 3 else f"{taus[0]} .. {taus[-1]}")
        sizes = sorted({len(b.params) for b in bs})
        regions = [b.region or "-" for b in bs]
        where = _group([(r, []) for r in regions])
        rows.append([
            kind, str(len(bs)), tau,
            "-".join(map(str, (sizes[0], sizes[-1]) if len(sizes) > 1 else sizes)),
            ", ".join(dict.fromkeys(n for n, _ in where)),
        ])
    return rows


def format_plan(plan: Plan) -> str:
    """The whole plan: dims, parameters, residual branches, FP8, uncovered ops."""

    def dims(kind: str) -> str:
        return ", ".join(f"{k}={v}" for k, (kd, v) in plan.symbols.items() if kd == kind)

    params = _param_rows(plan)
    grouped = _group(params)
    name = {"umup": "u-muP", "mup": "muP (baseline)", "sp": "SP (baseline)",
            "sp_emb_lr": "SP + embedding LR (baseline)"}[plan.parametrization]
    head = (f"{name} plan for {plan.model_name}: depth L={plan.depth}, "
            f"{len(plan.branches)} residual branches, {len(plan.params)} parameters")
    if len(grouped) < len(params):
        head += f" ({len(grouped)} rows: blocks alike are one row; plan.params has each)"
    lines = [head, f"width-like dims: {dims('width') or '-'}",
             f"fixed dims: {dims('fixed') or '-'}"]
    if dims("data"):
        lines.append(f"data dims (any size; example = the reference size of every scale, "
                     f"rules section 3): {dims('data')}")
    lines.append("")
    lines += _table([[name, *cells] for name, cells in grouped],
                    ["parameter", "shape", "role", "fan_in", "fan_out", "LR", "FP8"])
    lines += ["", *_lr_lines(plan)]
    if plan.branches:
        lines += ["", "residual branches (tau from rules section 4, in forward order):"]
        lines += _table(_branch_rows(plan), ["kind", "count", "tau", "params each", "blocks"])
    n_fp8 = sum(p.fp8 for p in plan.params.values())
    if n_fp8 and plan.fp8_mode == "off":
        lines += ["", f"FP8 matmuls: {n_fp8} linears eligible (FP8 column), "
                      "off (transform with fp8=True to use)"]
    elif n_fp8:
        lines += ["", f"FP8 matmuls: {n_fp8} linears in FP8 (FP8 column), E4M3 forward, "
                      "E5M2 grads, static scale 1", f"  {_fp8_path(plan.fp8_mode)}"]
    if plan.notes:
        lines += ["", "notes:"] + [f"  {note}" for note in plan.notes]
    if plan.uncovered:
        lines += ["", "ops no u-muP rule covers (pass through unscaled):"]
        lines += [f"  {name}: {op} at {src}" for name, op, src in plan.uncovered]
    if plan.unknown_shape_ops:
        lines += ["", "ops with no shape rule (their dims were not tied to others):"]
        lines += [f"  {o}" for o in plan.unknown_shape_ops]
    return "\n".join(lines)


# -- the picture -----------------------------------------------------------------------
_ROLE_COLORS = {"input": "#9ecae1", "hidden": "#a1d99b", "output": "#fdae6b",
                "bias": "#dadaeb", "norm": "#fdd0a2", "fixed": "#d9d9d9"}
_FP8_COLOR = "#fb6a4a"


def draw(graph: Any, path: str | Path, plan: Plan | None = None) -> Path:
    """Write an SVG of a rewritten graph, weight ops coloured by role and FP8 ops red.

    ``graph``: a ``GraphModule`` (``model.graph_module``, a block's ``graph_module``,
    ``model.region_graphs()[...]``) or a transformed model (its root graph). ``plan``:
    where the roles come from (default: the model's ``umup_plan``). Needs ``pydot`` and
    Graphviz's ``dot`` (``pip install pydot``; ``apt install graphviz``).
    """
    from torch.fx.passes import graph_drawer

    if not getattr(graph_drawer, "HAS_PYDOT", False):
        raise UmupError("umup_fx.report.draw needs pydot and Graphviz: pip install pydot, "
                        "and install Graphviz's `dot` (apt install graphviz / brew install "
                        "graphviz).")
    gm = graph
    if not isinstance(gm, torch.fx.GraphModule):
        plan = plan if plan is not None else getattr(graph, "umup_plan", None)
        gm = getattr(graph, "graph_module", None)
        if not isinstance(gm, torch.fx.GraphModule):
            raise UmupError("draw: a GraphModule or a transformed model, "
                            f"not {type(graph).__name__}.")
    params = plan.params if plan is not None else {}
    dot = graph_drawer.FxGraphDrawer(gm, "umup", ignore_getattr=True).get_main_dot_graph()
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        weight = meta.get(node, meta.WEIGHT)
        fp8 = bool(meta.get(node, meta.FP8))
        if weight is None and not fp8:
            continue
        found = dot.get_node(node.name) or dot.get_node(f'"{node.name}"')
        if not found:
            continue
        role = params[weight].role if weight in params else None
        tag = ", ".join(t for t in (role, "FP8" if fp8 else None, weight) if t)
        found[0].set("fillcolor", _FP8_COLOR if fp8 else _ROLE_COLORS.get(role or "", "white"))
        found[0].set("xlabel", tag)
    out = Path(path)
    try:
        out.write_bytes(dot.create_svg())
    except Exception as exc:  # pydot raises when Graphviz's `dot` is missing
        raise UmupError(f"draw: Graphviz could not render ({exc}); install Graphviz's "
                        "`dot` (apt install graphviz / brew install graphviz).") from exc
    return out
