"""Residual split / add with tau (rules §4) and plain adds of two activations."""

from __future__ import annotations

import torch
from torch import Tensor

from umup_fx.runtime.ops.scaling import (
    scale_bwd,
    scale_fwd,
)


# -- residuals and adds ----------------------------------------------------------------
def residual_split(x: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """Residual rule, split: (branch, skip) = x; grads * tau/sqrt(1+tau^2), 1/sqrt(1+tau^2)."""
    denom = (1 + tau**2) ** 0.5
    return scale_bwd(x, tau / denom), scale_bwd(x, 1 / denom)


def residual_add(branch_output: Tensor, skip: Tensor, tau: float) -> Tensor:
    """Residual rule, add: (tau * f + skip) / sqrt(1+tau^2); grads unscaled (split scales them)."""
    denom = (1 + tau**2) ** 0.5
    return scale_fwd(branch_output, tau / denom) + scale_fwd(skip, 1 / denom)


def add(a: Tensor | float, b: Tensor | float) -> Tensor:
    """Plain-add rule: (a + b) * 2^-1/2 forward, each input grad * 2^-1/2 (tied)."""
    # As U.add: a Python number, or a one-element tensor, does not change the scale of
    # the other operand, so the add is left unscaled. With the reference's default
    # to_output_scale constraint the grad scales equal the output scale even under
    # broadcasting (its broadcast-size grad scales are overridden).
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        return torch.add(a, b)  # type: ignore[arg-type]
    if a.numel() == 1 or b.numel() == 1:
        return a + b
    s = 2**-0.5
    return scale_fwd(scale_bwd(a, s) + scale_bwd(b, s), s)
