"""Baselines from the same analysis: μP, standard parametrization (SP), SP + embedding LR.

``transform(model, inputs, parametrization=...)`` runs the one capture and analysis and
then applies the chosen parametrization (docs/rules.md, "Baselines"):

- ``"umup"``: u-μP, the default (the rewrite passes of ``pipeline.rewrite_passes``).
- ``"sp"``: the model as written; every parameter at LR ``η``; the model's own init.
- ``"sp_emb_lr"``: SP with the embedding (``input`` role) LR multiplied by
  ``fan_out / base_fan_out``, the width factor μP gives it relative to the hidden
  weights (Kalra & Barkeshli 2026: that one change carries most of μP's benefit).
- ``"mup"``: μP for Adam as the u-μP paper's Table 2 writes it, relative to ``base``
  (the same architecture at the base width): hidden weights init
  ``σ_init · (base_fan_in / fan_in)^½`` and LR ``η · base_fan_in / fan_in``; input and
  output weights init ``σ_init``, LR ``η``; the readout's output times
  ``base_fan_in / fan_in``; attention logits ``√d_base / d_head`` instead of
  ``1/√d_head`` (μP's ``1/d``, equal to the model's own scale at the base width).
  At the base width μP is SP.

Fans and their ratios come from the symbolic dims of both models' analyses, matched
by parameter name; no base shapes are written by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from umup_fx import rules
from umup_fx.options import NEEDS_BASE, PARAMETRIZATIONS  # noqa: F401 (re-exported)
from umup_fx.passes.mup import attention_head_sizes
from umup_fx.plan import Plan


@dataclass(frozen=True)
class BaseShapes:
    """What μP needs of the base model: each parameter's (fan_in, fan_out) values and
    the head size of each attention op, in graph order."""

    fans: dict[str, tuple[int | None, int | None]] = field(default_factory=dict)
    head_sizes: tuple[int, ...] = ()


def base_shapes(base: nn.Module, example_inputs: Any, example_kwargs: dict | None) -> BaseShapes:
    """Analyse ``base`` (the same architecture at the base width) on the same inputs."""
    from umup_fx.capture.trace import capture
    from umup_fx.pipeline import analyze_graph
    from umup_fx.plan import expand_blocks

    captured = capture(base, example_inputs, example_kwargs)
    plan = analyze_graph(captured.gm, model_name=type(base).__name__)
    expand_blocks(plan, captured.gm, captured.blocks)
    return BaseShapes(
        fans={n: (p.fan_in_value, p.fan_out_value) for n, p in plan.params.items()},
        head_sizes=tuple(attention_head_sizes(captured.gm)),
    )






def apply(plan: Plan, parametrization: str, base: BaseShapes | None, sigma_init: float) -> None:
    """Set each parameter's LR factor and init for a baseline parametrization (in place)."""
    plan.parametrization = parametrization
    if parametrization == "umup":
        return
    for name, p in plan.params.items():
        p.frozen_by_umup = False  # norms stay parametric outside u-muP
        p.depth_scaled = False
        p.lr_factor, p.init, p.init_std = 1.0, "keep", None
        fan_in, fan_out = base.fans.get(name, (None, None)) if base else (None, None)
        if parametrization == "sp_emb_lr" and p.role == rules.INPUT and fan_out:
            p.lr_factor = p.fan_out_value / fan_out
        elif parametrization == "mup" and p.role in rules.WEIGHT_ROLES:
            p.init, p.init_std = "normal", sigma_init  # biases and norms: the model's own
            if p.role == rules.HIDDEN and fan_in:
                p.lr_factor = fan_in / p.fan_in_value
                p.init_std = sigma_init * (fan_in / p.fan_in_value) ** 0.5
