"""Normalisations (rules §3): layer, batch, group and RMS norm; non-parametric by
default, with scaled gain / shift gradients when trainable."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from umup_fx.runtime.ops.linears import _norm_params, param_grad_scale


def layer_norm(
    x: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    numel: int | None = None,
) -> Tensor:
    """Norm rule: plain layer_norm; gain and bias grads * (d / numel)^1/2 (``numel``: x's
    reference size fixed at transform time, None: this call's)."""
    weight, bias = _norm_params(weight, bias, x, numel)
    return F.layer_norm(x, tuple(normalized_shape), weight, bias, eps)


def batch_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    numel: int | None = None,
) -> Tensor:
    """Norm rule: plain batch_norm (statistics per channel, dim 1); gain and bias grads
    * (C / numel)^1/2; ``training`` is the module's flag at call time."""
    weight, bias = _norm_params(weight, bias, x, numel)
    return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)


def group_norm(
    x: Tensor, num_groups: int, weight: Tensor | None = None, bias: Tensor | None = None,
    eps: float = 1e-5, *, numel: int | None = None,
) -> Tensor:
    """Norm rule: plain group_norm; gain and bias grads * (C / numel)^1/2."""
    weight, bias = _norm_params(weight, bias, x, numel)
    return F.group_norm(x, num_groups, weight, bias, eps)


def rms_norm(
    x: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
    *,
    numel: int | None = None,
) -> Tensor:
    """Norm rule: plain rms_norm; gain grad * (d / numel)^1/2."""
    # PyTorch's kernel and eps default (dtype eps), where U.rms_norm hand-computes
    # x / sqrt(mean(x^2) + 1e-5) in fp32: same function, rounding-level differences.
    if weight is not None:
        weight = param_grad_scale(weight, x, numel)
    return F.rms_norm(x, tuple(normalized_shape), weight, eps)
