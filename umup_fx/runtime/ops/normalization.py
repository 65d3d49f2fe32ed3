"""Normalisations (rules §3): layer, batch, group and RMS norm; non-parametric by
default, with scaled gain / shift gradients when trainable.

``input_scale`` (and ``norm_eps``) exist for pretrained import only: the imported model's
norm input is the checkpoint's divided by a constant ``c`` (a 0-dim buffer per norm,
``passes/scale_norms.py``), and ``norm(c x)`` is the checkpoint's norm with its own eps
(docs/deploy.md). Every other model calls the ops without it: PyTorch's kernel, nothing
added."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from umup_fx.runtime.ops.linears import _norm_params, param_grad_scale
from umup_fx.runtime.ops.scaling import scale_bwd


def layer_norm(
    x: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    numel: int | None = None,
    input_scale: Tensor | None = None,
) -> Tensor:
    """Norm rule: plain layer_norm; gain and bias grads * (d / numel)^1/2 (``numel``: x's
    reference size fixed at transform time, None: this call's); of ``x * input_scale``
    where given."""
    weight, bias = _norm_params(weight, bias, x, numel)
    if input_scale is not None:
        x = x * input_scale
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
    eps: float = 1e-5, *, numel: int | None = None, input_scale: Tensor | None = None,
) -> Tensor:
    """Norm rule: plain group_norm; gain and bias grads * (C / numel)^1/2; of
    ``x * input_scale`` where given."""
    weight, bias = _norm_params(weight, bias, x, numel)
    if input_scale is not None:
        x = x * input_scale
    return F.group_norm(x, num_groups, weight, bias, eps)


def rms_norm(
    x: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
    *,
    numel: int | None = None,
    input_scale: Tensor | None = None,
) -> Tensor:
    """Norm rule: plain rms_norm; gain grad * (d / numel)^1/2; of ``x * input_scale``
    where given."""
    # PyTorch's kernel and eps default (dtype eps), where U.rms_norm hand-computes
    # x / sqrt(mean(x^2) + 1e-5) in fp32: same function, rounding-level differences.
    if weight is not None:
        weight = param_grad_scale(weight, x, numel)
    if input_scale is not None:
        x = x * input_scale
    return F.rms_norm(x, tuple(normalized_shape), weight, eps)


def norm_eps(eps: float, input_scale: Tensor) -> Tensor:
    """The eps of a hand-written norm ``x * rsqrt(mean(x^2) + eps)`` whose input is
    ``input_scale`` times smaller than the checkpoint's: ``eps / input_scale^2``, so it
    computes the checkpoint's norm exactly (pretrained import)."""
    return eps / (input_scale * input_scale)


def weight_norm(v: Tensor, g: Tensor | None, dim: int = 0, *, n: int | None = None) -> Tensor:
    """A weight-normed weight at unit scale (rules.md "Weight norm"): ``g * v / ||v|| *
    sqrt(n)``, the norm over every axis but ``dim`` (PyTorch's ``_weight_norm``), ``n``
    the elements each norm runs over (``v.numel() / g.numel()``). At the gain's unit value
    1 every element has RMS 1 whatever ``v``'s scale; the weight op applies its own
    ``fan_in^-1/2``. ``g`` None: the non-parametric form (the gain at 1, out of the
    graph); else ``g``'s gradient, a sum over ``n`` elements, is scaled by ``n^-1/2``
    (the norm gain's ``(d / numel)^1/2``)."""
    if g is None:
        norms = torch.norm_except_dim(v, 2, dim)
        return v * ((v.numel() // norms.numel() if n is None else n) ** 0.5 / norms)
    n = v.numel() // max(g.numel(), 1) if n is None else n
    g = scale_bwd(g, n ** -0.5)
    return torch._weight_norm(v, g, dim) * n ** 0.5
