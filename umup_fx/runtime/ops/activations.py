"""Nonlinearities (rules §3): SiLU / GELU by the reference's interpolated scales,
every other activation and gated unit by its exact Gaussian moments, and dropout."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from umup_fx.runtime.ops.scaling import (
    log_interp,
    scale_bwd,
    scale_fwd,
)

# -- activations -----------------------------------------------------------------------
# Empirical std models (reference): output interp(a, 2, sqrt(2/(1-1/pi))), a = 1/(1+0.25/mult^2);
# input grad interp(a', 2, sqrt(2)), a' = 1/(1+1/mult^2) for silu and a' = a for gelu.
_ACT_OUT_UPPER = (2 / (1 - 1 / math.pi)) ** 0.5


def _act_scales(mult: float, grad_alpha: float, tied: bool) -> tuple[float, float]:
    out_scale = log_interp(1 / (1 + 0.25 / mult**2), lower=2.0, upper=_ACT_OUT_UPPER)
    if tied:  # reference default (to_output_scale): the rules table's grad scale is tied=False
        return out_scale, out_scale
    return out_scale, log_interp(grad_alpha, lower=2.0, upper=2**0.5)


def _silu(x: Tensor, mult: float) -> Tensor:
    return F.silu(x) if mult == 1 else x * torch.sigmoid(x * mult)  # = silu(mult x) / mult


def silu(x: Tensor, *, mult: float = 1.0, tied: bool = True) -> Tensor:
    """SiLU rule: silu(mult x)/mult * interp(a, 2, sqrt(2/(1-1/pi))); x grad tied (or interp(a'..))."""
    out_scale, grad_scale = _act_scales(mult, 1 / (1 + 1 / mult**2), tied)
    return scale_fwd(_silu(scale_bwd(x, grad_scale), mult), out_scale)


def gelu(x: Tensor, *, mult: float = 1.0, approximate: str = "none", tied: bool = True) -> Tensor:
    """GELU rule: gelu(mult x)/mult * interp(a, 2, sqrt(2/(1-1/pi))); x grad tied (or interp(a..))."""
    out_scale, grad_scale = _act_scales(mult, 1 / (1 + 0.25 / mult**2), tied)
    x = scale_bwd(x, grad_scale)
    y = (
        F.gelu(x, approximate=approximate)
        if mult == 1
        else F.gelu(x * mult, approximate=approximate) / mult
    )
    return scale_fwd(y, out_scale)


def silu_glu(up: Tensor, gate: Tensor, *, mult: float = 1.0) -> Tensor:
    """Gated-unit rule: up * silu(mult gate)/mult * interp(a', 2, sqrt 2); both grads * the same."""
    s = log_interp(1 / (1 + 1 / mult**2), lower=2.0, upper=2**0.5)
    return scale_fwd(scale_bwd(up, s) * _silu(scale_bwd(gate, s), mult), s)


def dropout(x: Tensor, p: float = 0.5, training: bool = True) -> Tensor:
    """Dropout rule: F.dropout(x) * sqrt(1-p); grad x * sqrt(1-p)."""
    # As U.dropout: the sqrt(1-p) scales apply in eval too (training=False), which
    # keeps the output's mean equal between train and eval.
    s = (1 - p) ** 0.5
    return scale_fwd(F.dropout(scale_bwd(x, s), p, training), s)




# -- exact-moment activations and gated units ----------------------------------------
# Unit-scaling principle (u-muP paper, App. B): scale an op so that a unit-Gaussian input
# gives a unit-std output. For an elementwise f that scale is a constant, 1/std(f(X)),
# X ~ N(0, 1), here computed by numerical integration rather than read off the empirical
# interp models above (``silu`` / ``gelu`` keep those, as the reference library).
def _quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


def _relu2(x: Tensor) -> Tensor:
    return torch.square(F.relu(x))


# kind -> (f, the keyword arguments f accepts). Kwargs are checked up front so a typo
# fails here, not inside the integration (which Dynamo runs while tracing).
_ACTIVATIONS: dict[str, tuple[Callable[..., Tensor], frozenset[str]]] = {
    "relu": (F.relu, frozenset()),
    "leaky_relu": (F.leaky_relu, frozenset({"negative_slope"})),
    "tanh": (torch.tanh, frozenset()),
    "sigmoid": (torch.sigmoid, frozenset()),
    "softplus": (F.softplus, frozenset({"beta", "threshold"})),
    "quick_gelu": (_quick_gelu, frozenset()),
    "gelu": (F.gelu, frozenset({"approximate"})),
    "silu": (F.silu, frozenset()),
    "relu2": (_relu2, frozenset()),
    "square": (torch.square, frozenset()),
    "elu": (F.elu, frozenset({"alpha"})),
    "mish": (F.mish, frozenset()),
    "hardswish": (F.hardswish, frozenset()),
}


# kind -> the keyword arguments it takes (``passes.match`` reads them off ATen nodes).
ACTIVATION_ARGS = {kind: names for kind, (_, names) in _ACTIVATIONS.items()}


def _activation_fn(kind: str, fn_kwargs: dict[str, Any]) -> Callable[..., Tensor]:
    if kind not in _ACTIVATIONS:
        raise ValueError(
            f"unknown activation kind {kind!r}; expected one of {sorted(_ACTIVATIONS)}"
        )
    fn, allowed = _ACTIVATIONS[kind]
    unknown = set(fn_kwargs) - allowed
    if unknown:
        raise ValueError(
            f"activation {kind!r} takes keyword arguments {sorted(allowed)}, got {sorted(unknown)}"
        )
    return fn


def _check_mult(mult: float) -> float:
    # The scale is a constant of (kind, mult): a symbolic mult (a SymFloat from
    # torch.compile(dynamic=True)) has no value to integrate with.
    if isinstance(mult, bool) or not isinstance(mult, (int, float)):
        raise ValueError(
            f"activation mult must be a concrete Python number, got {type(mult).__name__} "
            "(a symbolic mult cannot be integrated; pass it as a constant)"
        )
    if mult == 0 or not math.isfinite(mult):
        raise ValueError(f"activation mult must be finite and non-zero, got {mult}")
    return float(mult)


def _apply(fn: Callable[..., Tensor], x: Tensor, mult: float, fn_kwargs: dict[str, Any]) -> Tensor:
    """f(mult x) / mult: the muP multiplier inside, divided out so mult -> 0 tends to x f'(0)."""
    return fn(x, **fn_kwargs) if mult == 1 else fn(x * mult, **fn_kwargs) / mult


try:  # Leaves every Python dispatch mode (FakeTensorMode, make_fx's proxy mode, ...).
    from torch.utils._python_dispatch import _disable_current_modes as _no_dispatch_modes
except ImportError:  # pragma: no cover - private helper; plain eager is right outside tracing
    import contextlib

    _no_dispatch_modes = contextlib.nullcontext  # type: ignore[assignment]

# Simpson's rule on [-12, 12]: the N(0, 1) mass outside is ~4e-33, and 200001 points
# (h = 1.2e-4) integrate the kinks of relu-like f (on grid points at mult = 1) to ~1e-9.
_GRID_POINTS = 200_001
_GRID_HALF_WIDTH = 12.0


@functools.cache  # lru_cache(maxsize=None)
def _gaussian_scale_cached(
    kind: str, mult: float, gated: bool, kwargs_items: tuple[tuple[str, Any], ...]
) -> float:
    fn = _ACTIVATIONS[kind][0]
    # Real float64 CPU tensors even while tracing: under fake/proxy modes these would
    # otherwise be fake (no values) or be recorded into the traced graph.
    with _no_dispatch_modes(), torch.no_grad():
        x = torch.linspace(
            -_GRID_HALF_WIDTH, _GRID_HALF_WIDTH, _GRID_POINTS, dtype=torch.float64, device="cpu"
        )
        coef = torch.full_like(x, 2.0)
        coef[1::2] = 4.0
        coef[0] = coef[-1] = 1.0
        w = coef * torch.exp(-0.5 * x * x)
        w = w / w.sum()  # Simpson weights times the pdf, normalised: E[1] = 1 exactly
        y = _apply(fn, x, mult, dict(kwargs_items))
        # Gated: up * f(gate) with an independent zero-mean unit `up` has mean 0 and
        # variance E[f^2]. Plain: centred, as a constant offset (sigmoid's 1/2) is not scale.
        centre = 0.0 if gated else (w * y).sum()
        v = float((w * torch.square(y - centre)).sum())
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"activation {kind!r} (mult={mult}) has output variance {v}; cannot scale")
    return v**-0.5


@torch.compiler.assume_constant_result
def _gaussian_scale(
    kind: str, mult: float, gated: bool, kwargs_items: tuple[tuple[str, Any], ...]
) -> float:
    # Dynamo calls this eagerly while tracing and keeps the result as a constant. It
    # would trace *into* an lru_cache-wrapped function (and fail on the integration),
    # hence this plain wrapper around the cached one.
    return _gaussian_scale_cached(kind, mult, gated, kwargs_items)


def activation_scale(
    kind: str, *, mult: float = 1.0, gated: bool = False, **fn_kwargs: Any
) -> float:
    """1/std(f(mult X)/mult), X ~ N(0, 1) (gated: 1/sqrt(E[(f(mult X)/mult)^2])), cached."""
    _activation_fn(kind, fn_kwargs)
    mult = _check_mult(mult)
    return _gaussian_scale(kind, mult, gated, tuple(sorted(fn_kwargs.items())))


def activation(x: Tensor, kind: str, *, mult: float = 1.0, **fn_kwargs: Any) -> Tensor:
    """Activation rule: f(mult x)/mult * s, s = 1/std(f(mult X)/mult), X ~ N(0,1); x grad * s (tied).

    ``kind``: relu, leaky_relu (negative_slope), tanh, sigmoid, softplus (beta,
    threshold), quick_gelu, gelu (approximate), silu, relu2, square, elu (alpha), mish,
    hardswish; ``fn_kwargs`` go to f.
    """
    fn = _activation_fn(kind, fn_kwargs)
    # Gradient scale tied to the output scale, as the reference's default constraint.
    s = activation_scale(kind, mult=mult, **fn_kwargs)
    return scale_fwd(_apply(fn, scale_bwd(x, s), float(mult), fn_kwargs), s)


def glu(up: Tensor, gate: Tensor, kind: str, *, mult: float = 1.0, **fn_kwargs: Any) -> Tensor:
    """Gated-unit rule: up * f(mult gate)/mult * s, s = 1/sqrt(E[(f(mult X)/mult)^2]); up, gate grads * s.

    Same kinds and ``fn_kwargs`` as :func:`activation`. The product with an independent
    unit ``up`` has mean 0, so its std is the RMS of f(X), not f's centred std.
    """
    fn = _activation_fn(kind, fn_kwargs)
    s = activation_scale(kind, mult=mult, gated=True, **fn_kwargs)
    return scale_fwd(scale_bwd(up, s) * _apply(fn, scale_bwd(gate, s), float(mult), fn_kwargs), s)
