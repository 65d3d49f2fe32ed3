"""Unit initialisation (rules §2), read from the plan: the one place weights are reset."""

from __future__ import annotations

import torch
from torch import nn

from .plan import Plan


@torch.no_grad()
def unit_init(model: nn.Module, plan: Plan, generator: torch.Generator | None = None) -> None:
    """Weights N(0, 1), biases 0, norm gains 1 (shifts 0); freeze non-parametric norms.

    Uses the global RNG unless ``generator`` is given (seed it for reproducible init).
    """
    params = dict(model.named_parameters())
    for name, p in plan.params.items():
        tensor = params[name]
        if p.init == "normal":
            tensor.normal_(0.0, 1.0, generator=generator)
        elif p.init == "zeros":
            tensor.zero_()
        elif p.init == "ones":
            tensor.fill_(1.0)
        if p.frozen_by_umup:
            tensor.requires_grad_(False)


def initialise(model: nn.Module, plan: Plan, reinit: bool = True) -> None:
    """``unit_init`` (``reinit``), or only freeze the non-parametric norms (weights are
    loaded afterwards)."""
    if reinit:
        unit_init(model, plan)
        return
    for p in plan.params.values():
        if p.frozen_by_umup:
            model.get_parameter(p.name).requires_grad_(False)
