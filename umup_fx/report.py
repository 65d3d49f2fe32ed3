"""Readable reports: the plan as a table (``str(plan)``, ``umup_fx.explain``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import sympy as sp

if TYPE_CHECKING:
    from .plan import Plan


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


_FP8_PATHS = {
    "auto": "path auto: torch._scaled_mm on sm_89+ GPUs, simulated cast elsewhere",
    "simulate": "path simulate: cast to FP8 and back, matmul in the model's dtype",
    "scaled_mm": "path scaled_mm: real FP8 tensor-core matmuls",
}


def format_plan(plan: Plan) -> str:
    """The whole plan: parameters, residual branches, FP8 matmuls, uncovered ops."""
    widths = ", ".join(f"{k}={v}" for k, (kind, v) in plan.symbols.items() if kind == "width")
    fixed = ", ".join(f"{k}={v}" for k, (kind, v) in plan.symbols.items() if kind == "fixed")
    lines = [
        f"u-muP plan for {plan.model_name}: depth L={plan.depth}, "
        f"{len(plan.branches)} residual branches, {len(plan.params)} parameters",
        f"width-like dims: {widths or '-'}",
        f"fixed dims: {fixed or '-'}",
        "",
    ]
    rows = []
    for p in plan.params.values():
        role = p.role + ("" if p.trainable else " (frozen)")
        if len(p.uses) > 1:
            role += " [tied: " + ", ".join(u.role for u in p.uses) + "]"
        rows.append(
            [
                p.name,
                "x".join(map(str, p.shape)),
                role,
                _fan(p.fan_in, p.fan_in_value),
                _fan(p.fan_out, p.fan_out_value),
                f"{p.lr_rule} = eta*{p.lr_factor:.4g}",
                "yes" if p.fp8 else "-",
            ]
        )
    lines += _table(rows, ["parameter", "shape", "role", "fan_in", "fan_out", "LR", "FP8"])
    if plan.branches:
        lines += ["", "residual branches (tau from rules section 4):"]
        lines += _table(
            [[str(b.index), b.kind, f"{b.tau:.4g}", b.add, str(len(b.params))] for b in plan.branches],
            ["#", "kind", "tau", "add node", "params"],
        )
    if plan.fp8_ops:
        path = _FP8_PATHS.get(plan.fp8_mode, "eligible; off (transform with fp8=True to use)")
        lines += ["", f"FP8 matmuls (E4M3 forward, E5M2 grads, static scale 1) - {path}:"]
        lines += [f"  {w}  ({node})" for node, w in plan.fp8_ops]
    if plan.uncovered:
        lines += ["", "ops no u-muP rule covers (pass through unscaled):"]
        lines += [f"  {name}: {op} at {src}" for name, op, src in plan.uncovered]
    if plan.unknown_shape_ops:
        lines += ["", "ops with no shape rule (their dims were not tied to others):"]
        lines += [f"  {o}" for o in plan.unknown_shape_ops]
    return "\n".join(lines)
