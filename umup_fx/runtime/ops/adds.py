"""Residual split / add with tau (rules §4), plain adds of two activations, sums of tables."""

from __future__ import annotations

import math
from collections.abc import Sequence

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


def add(a: Tensor | float, b: Tensor | float,
        grad_scales: tuple[float, float] | None = None) -> Tensor:
    """Plain-add rule: (a + b) * 2^-1/2 forward, each input grad * 2^-1/2 (tied).
    ``grad_scales``: each input's grad scale instead, where a broadcast operand's summed
    gradient is brought back to unit (``2^-1/2 (its numel / the sum's numel)^1/2``)."""
    # As U.add: a Python number, or a one-element tensor, does not change the scale of
    # the other operand, so the add is left unscaled. With the reference's default
    # to_output_scale constraint the grad scales equal the output scale even under
    # broadcasting (its broadcast-size grad scales are overridden).
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        return torch.add(a, b)  # type: ignore[arg-type]
    if a.numel() == 1 or b.numel() == 1:
        return a + b
    s = 2**-0.5
    ga, gb = grad_scales or (s, s)
    return scale_fwd(scale_bwd(a, ga) + scale_bwd(b, gb), s)


def add_tables(*tables: Tensor, grad_scales: Sequence[float] | None = None) -> Tensor:
    """Sum-of-tables rule (rules §3): the n lookups' sum * n^-1/2 forward (unit), and
    each table's grad the sum's grad, * (its numel / the sum's numel)^1/2 where it was
    broadcast (the reference library's add with no constraint). ``grad_scales``: those
    factors at the reference sizes (None: this call's)."""
    if grad_scales is None:
        n = math.prod(torch.broadcast_shapes(*(t.shape for t in tables)))
        grad_scales = [(t.numel() / n) ** 0.5 for t in tables]
    out = scale_bwd(tables[0], grad_scales[0])
    for t, s in zip(tables[1:], grad_scales[1:], strict=True):
        out = out + scale_bwd(t, s)
    return scale_fwd(out, len(tables) ** -0.5)
