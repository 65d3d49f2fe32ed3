"""Static-scale FP8 matmuls (rules §7): E4M3 inputs and weights, E5M2 gradients, scale 1.

Unit scaling keeps the inputs of the non-critical matmuls at RMS ~1 for the whole run,
so their FP8 casts need no amax tracking: every scale is 1 and a cast is one saturating
clamp plus a dtype conversion. Two paths, same numbers up to accumulation order:

* ``"scaled_mm"``: real FP8 through ``torch._scaled_mm`` (NVIDIA sm_89+). Its rules:
  the left operand row-major, the right column-major, every dim a multiple of 16,
  float32 scales, and not both operands E5M2 (so grads pair with E4M3 values).
* ``"simulate"``: cast to the FP8 dtype and back, then the ordinary matmul in the
  model's dtype. Exact FP8 rounding and saturation on any device: CPU tests run it.

``"auto"`` picks ``scaled_mm`` where the hardware and the shapes allow and
``simulate`` elsewhere; a layer whose shapes FP8 cannot take falls back once, with a
warning that names it.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from umup_fx.runtime.ops.linears import grouped_op, linear_grad_scales
from umup_fx.runtime.ops.scaling import _rows, scale_bwd, scale_fwd

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
E4M3_MAX = torch.finfo(E4M3).max  # 448
E5M2_MAX = torch.finfo(E5M2).max  # 57344

_warned: set[str] = set()


def to_fp8(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Saturating cast (finite values never become inf / NaN), static scale 1."""
    limit = torch.finfo(dtype).max
    return x.clamp(-limit, limit).to(dtype)


def round_trip(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` rounded to an FP8 format and back to its own dtype (the simulation)."""
    return to_fp8(x, dtype).to(x.dtype)


def has_fp8_matmul(device: torch.device) -> bool:
    """True on CUDA devices with FP8 tensor cores (compute capability 8.9+)."""
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def _fits_scaled_mm(x2d: Tensor, w: Tensor) -> bool:
    # Forward [M,K]@[K,N], grad_x [M,N]@[N,K], grad_w [N,M]@[M,K]: every dim % 16.
    return all(d % 16 == 0 for d in (x2d.shape[0], x2d.shape[1], w.shape[0]))


def _mm(a8: Tensor, b8: Tensor, out_dtype: torch.dtype) -> Tensor:
    """a8 [M,K] @ b8 [K,N] on FP8 tensor cores; b8 must be column-major (a .t() view)."""
    one = torch.ones((), device=a8.device, dtype=torch.float32)
    return torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=out_dtype)


class _Fp8Matmul(torch.autograd.Function):
    """y = x @ w^T with x, w in E4M3; grad_x, grad_w from an E5M2 grad; scale 1."""

    @staticmethod
    def forward(ctx: Any, x2d: Tensor, w: Tensor, real: bool) -> Tensor:  # type: ignore[override]
        x8, w8 = to_fp8(x2d, E4M3), to_fp8(w, E4M3)
        ctx.save_for_backward(x8, w8)
        ctx.real, ctx.dtype = real, x2d.dtype
        if real:
            return _mm(x8, w8.t(), x2d.dtype)
        return x8.to(x2d.dtype) @ w8.to(x2d.dtype).t()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:  # type: ignore[override]
        x8, w8 = ctx.saved_tensors
        g8 = to_fp8(grad, E5M2)
        if ctx.real:
            # E5M2 x E4M3 is allowed; the right operands are made column-major.
            grad_x = _mm(g8, w8.t().contiguous().t(), ctx.dtype)
            grad_w = _mm(g8.t().contiguous(), x8.t().contiguous().t(), ctx.dtype)
        else:
            g = g8.to(ctx.dtype)
            grad_x = g @ w8.to(ctx.dtype)
            grad_w = g.t() @ x8.to(ctx.dtype)
        return grad_x, grad_w, None


def _warn_once(name: str, why: str) -> None:
    if name not in _warned:
        _warned.add(name)
        warnings.warn(f"umup_fx FP8: {name} {why}", stacklevel=3)


def resolve_path(mode: str, x: Tensor, weight: Tensor, name: str) -> str:
    """"scaled_mm" or "simulate" for one call of a layer (warns once on fallback)."""
    if mode == "simulate":
        return "simulate"
    if not has_fp8_matmul(x.device):
        if mode == "scaled_mm":
            raise RuntimeError(
                f"fp8='scaled_mm' needs an NVIDIA GPU with FP8 (sm_89+); {name} runs on "
                f"{x.device}. Use fp8=True (auto) or fp8='simulate'."
            )
        return "simulate"
    if not _fits_scaled_mm(x.reshape(-1, x.shape[-1]), weight):
        _warn_once(
            name,
            f"has shapes {tuple(x.shape)} x {tuple(weight.shape)} that torch._scaled_mm cannot "
            "take (every dim a multiple of 16); it runs the FP8 simulation instead.",
        )
        return "simulate"
    return "scaled_mm"


def linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    out_scale: float,
    grad_input_scale: float,
    weight_transposed: bool = False,
    mode: str = "auto",
    name: str = "linear",
    rows: int | None = None,
) -> Tensor:
    """The linear rule of ``ops.linear`` with the matmul in FP8 (static scale 1)."""
    x, w, bias = linear_grad_scales(x, weight, bias, grad_input_scale, weight_transposed, rows)
    real = resolve_path(mode, x, w, name) == "scaled_mm"
    out = _Fp8Matmul.apply(x.reshape(-1, x.shape[-1]), w, real)
    out = out.reshape(*x.shape[:-1], w.shape[0])
    if bias is not None:
        out = out + bias
    return scale_fwd(out, out_scale)


class _Fp8Grouped(torch.autograd.Function):
    """MoE experts' grouped matmul with x, W rounded to E4M3 and the gradient to E5M2
    (simulated: the model's own grouped op runs on the rounded values)."""

    @staticmethod
    def forward(ctx: Any, op: str, kwargs: dict, x: Tensor, w: Tensor, *args: Any) -> Tensor:  # type: ignore[override]
        x8, w8 = round_trip(x, E4M3), round_trip(w, E4M3)
        ctx.save_for_backward(x8, w8)
        ctx.op, ctx.args, ctx.kwargs = op, args, kwargs
        return grouped_op(op)(x8, w8, *args, **kwargs)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        x8, w8 = ctx.saved_tensors
        with torch.enable_grad():
            xs, ws = x8.detach().requires_grad_(), w8.detach().requires_grad_()
            y = grouped_op(ctx.op)(xs, ws, *ctx.args, **ctx.kwargs)
            grad_x, grad_w = torch.autograd.grad(y, (xs, ws), round_trip(grad, E5M2))
        return (None, None, grad_x, grad_w) + (None,) * len(ctx.args)


def grouped_linear(
    op: str,
    x: Tensor,
    weight: Tensor,
    *args: Any,
    out_scale: float,
    grad_input_scale: float,
    mode: str = "auto",
    name: str = "experts",
    rows: int | None = None,
    **kwargs: Any,
) -> Tensor:
    """``ops.grouped_linear`` with the experts' matmul in FP8 at static scale 1. It runs
    the simulation on every device for now (warned once on a GPU): a ``_scaled_grouped_mm``
    path needs its GPU check first (docs/fp8.md)."""
    if mode == "scaled_mm" or (mode == "auto" and has_fp8_matmul(x.device)):
        _warn_once(name, "is a grouped (MoE) matmul: it runs the FP8 simulation, not FP8 "
                         "tensor cores, so it is slower than bf16 there.")
    rows_per_expert = _rows(x, rows) / weight.shape[0]
    x = scale_bwd(x, grad_input_scale)
    weight = scale_bwd(weight, rows_per_expert**-0.5)
    return scale_fwd(_Fp8Grouped.apply(op, kwargs, x, weight, *args), out_scale)


__all__ = ["E4M3", "E5M2", "grouped_linear", "has_fp8_matmul", "linear", "round_trip", "to_fp8"]

