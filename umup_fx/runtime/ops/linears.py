"""Weight ops (rules §3): linear (hidden, input, readout), einsum and grouped (MoE)
linears, the expert combine, embedding, convolution, and parameters used as values."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from umup_fx.runtime.ops.scaling import (
    _rows,
    _scale,
    scale_bwd,
)


# -- linear / embedding / norms --------------------------------------------------------
def hidden_linear_scales(fan_in: int) -> tuple[float, float]:
    """(out_scale, grad_input_scale) of a hidden or input linear: both fan_in^-1/2 (tied)."""
    s = fan_in**-0.5
    return s, s


def readout_linear_scales(fan_in: int, fan_out: int, mult: float = 1.0) -> tuple[float, float]:
    """Readout (out_scale, grad_input_scale): alpha_out / fan_in, fan_out^-1/2 (cut edge)."""
    return mult / fan_in, fan_out**-0.5


def linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    out_scale: float,
    grad_input_scale: float,
    weight_transposed: bool = False,
    rows: int | None = None,
) -> Tensor:
    """Linear rule: F.linear(x, W, b) * out_scale; x grad * grad_input_scale, W, b grads * B^-1/2.

    ``rows``: the reference B fixed at transform time (None: this call's rows)."""
    # The forward scale is folded into the weight and bias: x (sW)^T + sb = s (x W^T + b).
    # It then multiplies the [out, in] weight instead of the [tokens, out] activation,
    # which costs nothing measurable (the activation multiply would be one more pass
    # over memory that Inductor cannot fuse into the matmul). Folding also puts s into
    # x's gradient (g sW), so x's backward scale is grad_input_scale / out_scale: 1, no
    # op at all, for hidden linears whose scales are tied. W's and b's gradients are
    # unchanged: B^-1/2 times the gradient at the unscaled output, as in U.linear.
    param_scale = _rows(x, rows) ** -0.5
    x = scale_bwd(x, grad_input_scale / out_scale)
    weight = _scale(weight, out_scale, param_scale)
    if bias is not None:
        bias = _scale(bias, out_scale, param_scale)
    if weight_transposed and weight.dim() > 2:  # a batched [..., in, out] operand (einsum)
        out = torch.matmul(x, weight)
        return out if bias is None else out + bias
    return F.linear(x, weight.t() if weight_transposed else weight, bias)


def einsum_linear(
    equation: str,
    x: Tensor,
    weight: Tensor,
    weight_first: bool = False,
    *,
    out_scale: float,
    grad_input_scale: float,
    rows: int | None = None,
) -> Tensor:
    """Linear rule for a weight used through ``torch.einsum(equation, x, W)`` (or W, x):
    the scale folded into W as in :func:`linear`; W's gradient * B^-1/2, where B is the
    number of times each weight entry is used (the product of x's letters W lacks), or
    the reference ``rows`` fixed at transform time."""
    if rows is None:
        subs = equation.replace(" ", "").split("->")[0].split(",")
        x_subs, w_subs = (subs[1], subs[0]) if weight_first else (subs[0], subs[1])
        rows = math.prod(n for c, n in zip(x_subs, x.shape, strict=True) if c not in w_subs)
    x = scale_bwd(x, grad_input_scale / out_scale)
    weight = _scale(weight, out_scale, rows**-0.5)
    return torch.einsum(equation, weight, x) if weight_first else torch.einsum(equation, x, weight)


def grouped_op(name: str) -> Callable[..., Tensor]:
    """The grouped matmul a model called, by schema name (``aten::_grouped_mm`` or
    transformers' ``grouped_mm_fallback``), resolved when it runs."""
    namespace, op = name.split("::")
    return getattr(getattr(torch.ops, namespace), op)


def grouped_linear(
    op: str,
    x: Tensor,
    weight: Tensor,
    *args: Any,
    out_scale: float,
    grad_input_scale: float,
    rows: int | None = None,
    **kwargs: Any,
) -> Tensor:
    """Linear rule for MoE experts, ``op(x[S, in], W[E, in, out], offs)``: each expert is
    a linear with its own fans, so the scales are :func:`linear`'s, folded into W; W's
    gradient * (rows per expert)^-1/2, the S rows (reference ``rows``, else this call's)
    shared evenly by E experts (as routed at init), since each expert's gradient sums
    over its own rows only."""
    rows_per_expert = _rows(x, rows) / weight.shape[0]
    x = scale_bwd(x, grad_input_scale / out_scale)
    weight = _scale(weight, out_scale, rows_per_expert**-0.5)
    return grouped_op(op)(x, weight, *args, **kwargs)


def combine_experts(
    expert_out: Tensor, gates: Tensor, *, scale: float, equation: str | None = None,
    gates_first: bool = False,
) -> Tensor:
    """Routed experts' outputs times their gates (``*``, or ``einsum(equation)``), then
    * ``scale`` forward and backward: tied, so the experts and the stream below see one
    gradient; the scale makes the top-k sum unit-scale at init, 1 / (g0 sqrt(k)) for k
    gates of g0 each. A gate's gradient sums over the d features it multiplies (a dot
    product, RMS sqrt(d)), so it is * (gates.numel() / expert_out.numel())^1/2: the
    router is a readout, whose input gradient u-muP scales apart (a cut edge)."""
    gates = scale_bwd(gates, (gates.numel() / expert_out.numel()) ** 0.5)
    if equation is None:
        weighted = expert_out * gates
    else:
        weighted = torch.einsum(equation, *((gates, expert_out) if gates_first else (expert_out, gates)))
    return _scale(weighted, scale, scale)


def linear_grad_scales(
    x: Tensor, weight: Tensor, bias: Tensor | None, grad_input_scale: float, transposed: bool,
    rows: int | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The linear rule's backward-only scales on (x, W[out, in], b), for a matmul whose
    output is then scaled by ``scale_fwd`` (the FP8 linear: its casts need W at unit
    scale, so the forward scale cannot be folded into the weight there)."""
    # As U.linear: the bias sits inside the forward scale (the whole output is scaled)
    # and its gradient gets the weight's B^-1/2, not out_scale.
    param_scale = _rows(x, rows) ** -0.5
    x = scale_bwd(x, grad_input_scale)
    weight = scale_bwd(weight, param_scale)
    if bias is not None:
        bias = scale_bwd(bias, param_scale)
    # transposed: stored [in, out] (HF GPT-2 Conv1D, addmm(b, x, W)).
    return x, weight.t() if transposed else weight, bias


def embedding(
    indices: Tensor, weight: Tensor, padding_idx: int | None = None, *, num_indices: int | None = None
) -> Tensor:
    """Embedding rule: plain lookup; weight grad * (V / num_indices)^1/2 (``num_indices``:
    the reference count fixed at transform time, None: this call's)."""
    n = indices.numel() if num_indices is None else num_indices
    weight = scale_bwd(weight, (weight.shape[0] / n) ** 0.5)
    return F.embedding(indices, weight, padding_idx)


def param_grad_scale(weight: Tensor, activation: Tensor, numel: int | None = None) -> Tensor:
    """Norm gain/bias rule: grad * (weight.numel() / activation.numel())^1/2 = (d / numel)^1/2
    (``numel``: the activation's reference size fixed at transform time, None: this call's)."""
    n = activation.numel() if numel is None else numel
    return scale_bwd(weight, (weight.numel() / n) ** 0.5)


def _norm_params(
    weight: Tensor | None, bias: Tensor | None, x: Tensor, numel: int | None = None
) -> tuple[Tensor | None, Tensor | None]:
    """A norm's gain and bias with their gradient scale (either may be None)."""
    return (None if weight is None else param_grad_scale(weight, x, numel),
            None if bias is None else param_grad_scale(bias, x, numel))


def broadcast_param(param: Tensor, other: Tensor, numel: int | None = None) -> Tensor:
    """A parameter added as is (a learned position table): grad * (numel / broadcast numel)^1/2.

    Broadcasting adds the gradients of every copy (each batch row); like the embedding
    rule's (V / indices)^1/2, this brings the sum of those unit gradients back to unit.
    ``numel``: the broadcast size at the reference shapes (None: this call's).
    """
    n = math.prod(torch.broadcast_shapes(param.shape, other.shape)) if numel is None else numel
    return scale_bwd(param, (param.numel() / n) ** 0.5)


def expand_param(param: Tensor, sizes: Sequence[int], numel: int | None = None) -> Tensor:
    """``param.expand(sizes)`` (a cls / register token copied over the batch); the copies'
    gradients are scaled by (numel / expanded numel)^1/2 before they add up (``numel``:
    the expanded size at the reference shapes, None: this call's)."""
    out = param.expand(*sizes)
    n = out.numel() if numel is None else numel
    return scale_bwd(out, (param.numel() / n) ** 0.5)




# -- convolution -----------------------------------------------------------------------
_CONVS: dict[int, Callable[..., Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _ntuple(v: int | Sequence[int], n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n  # type: ignore[arg-type]


def _conv_rows(
    x: Tensor,
    weight: Tensor,
    stride: int | Sequence[int],
    padding: int | Sequence[int] | str,
    dilation: int | Sequence[int],
) -> int:
    """Positions the kernel is applied to: N * prod(output spatial sizes) (B of the rule)."""
    nd = weight.dim() - 2
    rows = x.shape[0] if x.dim() == nd + 2 else 1  # unbatched [C, *spatial] input: N = 1
    spatial = x.shape[x.dim() - nd :]
    if padding == "same":  # output size = input size (PyTorch allows it only at stride 1)
        for size in spatial:
            rows *= size
        return rows
    pad = (0,) * nd if padding == "valid" else _ntuple(padding, nd)  # type: ignore[arg-type]
    for size, k, s, p, d in zip(
        spatial, weight.shape[2:], _ntuple(stride, nd), pad, _ntuple(dilation, nd), strict=True
    ):
        # PyTorch's output size; `//` keeps it symbolic under dynamic shapes.
        rows *= (size + 2 * p - d * (k - 1) - 1) // s + 1
    return rows


def conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] | str = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    *,
    out_scale: float,
    grad_input_scale: float,
    rows: int | None = None,
) -> Tensor:
    """Conv rule (1-3-D): conv(x, W, b) * out_scale; x grad * grad_input_scale; W, b grads * B^-1/2.

    B = N * prod(output spatial sizes): the reference ``rows`` fixed at transform time,
    None: this call's. Scales as a linear with fan_in = C_in/groups *
    prod(kernel) (e.g. ``hidden_linear_scales(fan_in)``).
    """
    nd = weight.dim() - 2
    if nd not in _CONVS or x.dim() not in (nd + 1, nd + 2):
        raise ValueError(
            f"conv: expected a 3-5-D weight and an input with 1 or 2 more dims than its "
            f"spatial ones, got weight {tuple(weight.shape)} and input {tuple(x.shape)}"
        )
    # As `linear`: a conv is a linear applied at every output position, each a row of
    # the rule. The forward scale is folded into W and b (one small multiply instead of
    # one over the activation), so x's backward scale is grad_input_scale / out_scale,
    # and W's, b's gradients get B^-1/2.
    if rows is None:
        rows = _conv_rows(x, weight, stride, padding, dilation)
    param_scale = rows**-0.5
    x = scale_bwd(x, grad_input_scale / out_scale)
    weight = _scale(weight, out_scale, param_scale)
    if bias is not None:
        bias = _scale(bias, out_scale, param_scale)
    return _CONVS[nd](x, weight, bias, stride, padding, dilation, groups)
