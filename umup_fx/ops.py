"""Runtime ops that a rewritten FX graph calls: the §3 rules of ``docs/rules.md``.

Scales enter through exactly two primitives, :func:`scale_fwd` (forward only) and
:func:`scale_bwd` (backward only), both built on one ``autograd.Function``. Every op is
the plain PyTorch op with these applied around it, so the unscaled numerics (kernels,
dtypes, SDPA backends) stay PyTorch's own.

Callers pass only numbers that are fixed for a model (fan-in, fan-out, tau, the alpha
multipliers). Scales that depend on the batch (rows of a linear, number of looked-up
indices, sequence length) are computed here from the tensors' shapes at run time, so a
graph accepts any batch size / sequence length. Under ``torch.compile(dynamic=True)``
those shapes are SymInts and the scales SymFloats; the scale arithmetic below therefore
uses only ``**`` and log2 (``math.log2`` under Dynamo, torch's symbolic log2 under
AOTAutograd / make_fx), which stay symbolic: ``math.log`` / ``math.exp`` would
specialise the graph to one size and recompile for every new one.

Where the reference library (``unit-scaling`` 0.3.5, ``unit_scaling.functional``)
differs from ``docs/rules.md``, the op's comment says which one it follows and why.

Outputs of :func:`scale_bwd` (and of ops whose forward scale is 1) may alias their input
(zero-copy); like any custom-Function output they must not be modified in place.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "activation",
    "activation_scale",
    "add",
    "data_parallel_size",
    "set_data_parallel_size",
    "attention_output_scale",
    "attention_scales",
    "batch_norm",
    "broadcast_param",
    "expand_param",
    "max_pool",
    "mean_over",
    "pick",
    "conv",
    "cross_entropy",
    "dropout",
    "einsum_linear",
    "embedding",
    "gelu",
    "group_norm",
    "glu",
    "hidden_linear_scales",
    "layer_norm",
    "linear",
    "log_interp",
    "matmul",
    "param_grad_scale",
    "readout_linear_scales",
    "residual_add",
    "residual_split",
    "rms_norm",
    "scale_bwd",
    "scale_fwd",
    "scaled_dot_product_attention",
    "silu",
    "silu_glu",
    "softmax",
]

_LN2 = math.log(2.0)


# -- primitives ------------------------------------------------------------------------
def _is_one(scale: float | Tensor) -> bool:
    # Only a concrete 1.0 skips the multiply; a symbolic scale is always applied.
    return isinstance(scale, (int, float)) and scale == 1.0


class _Scale(torch.autograd.Function):
    """y = fwd_scale * x in the forward pass; grad_x = bwd_scale * grad_y in the backward.

    A scale of None means 1 (no multiply). The caller decides that: Dynamo traces
    forward and backward as subgraphs, where a comparison on a symbolic scale (a guard)
    is not allowed.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, fwd_scale: float | Tensor | None, bwd_scale: float | None
    ) -> Tensor:
        # A Python (Sym)float on ctx, not a saved tensor: no dtype rounding of the
        # scale and nothing for Dynamo to lift into the graph.
        ctx.bwd_scale = bwd_scale
        return x if fwd_scale is None else x * fwd_scale

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        scale = ctx.bwd_scale
        return (grad if scale is None else grad * scale), None, None


def _scale(x: Tensor, fwd_scale: float | Tensor = 1.0, bwd_scale: float = 1.0) -> Tensor:
    """Forward x fwd_scale, backward x bwd_scale, in one node."""
    fwd = None if _is_one(fwd_scale) else fwd_scale
    if not (x.requires_grad and torch.is_grad_enabled()):
        # No backward will run: a plain multiply keeps inference graphs pure ATen.
        return x if fwd is None else x * fwd
    bwd = None if _is_one(bwd_scale) else bwd_scale
    if fwd is None and bwd is None:
        return x
    return _Scale.apply(x, fwd, bwd)  # type: ignore[no-any-return]


def scale_fwd(x: Tensor, scale: float | Tensor) -> Tensor:
    """Forward-only scale: returns ``x * scale``; the gradient passes through unchanged.

    ``scale`` is a Python (Sym)float, or a 0-d tensor that needs no gradient (a
    data-dependent count, as in :func:`cross_entropy`).
    """
    return _scale(x, fwd_scale=scale)


def scale_bwd(x: Tensor, scale: float) -> Tensor:
    """Backward-only scale: returns exactly ``x``; its gradient is multiplied by ``scale``."""
    return _scale(x, bwd_scale=scale)


# torch's symbolic log2 (private; math.log2 where absent). Only for real SymInt/SymFloat
# objects (AOTAutograd / make_fx tracing a rewritten graph), where math.log2 would
# specialise the size. Dynamo shows sizes to user code as int/float and traces
# math.log2 symbolically itself (it refuses to trace torch._sym_log2).
_sym_log2 = getattr(torch, "_sym_log2", math.log2)


def _log2(v: float) -> float:
    if isinstance(v, (torch.SymInt, torch.SymFloat)):
        return _sym_log2(v)  # type: ignore[no-any-return]
    return math.log2(v)


def log_interp(alpha: float, lower: float, upper: float) -> float:
    """Log-linear blend (rules §3 ``interp``): exp(alpha ln upper + (1 - alpha) ln lower)."""
    # Same value via base 2: log2 and ** stay symbolic under tracing, ln / exp do not.
    return 2.0 ** (alpha * _log2(upper) + (1 - alpha) * _log2(lower))


def _ln(n: float) -> float:
    return _log2(n) * _LN2  # ln n, symbolic-friendly (see log_interp)


def _rows(x: Tensor) -> int:
    """Rows a weight sees: every position of every batch element (B in the rules)."""
    return x.numel() // x.shape[-1]


# -- data parallelism ----------------------------------------------------------------
# A weight's gradient is scaled by B^-1/2 for the B rows it sums over. Under data
# parallelism each rank sums over its own B/N rows and DDP / FSDP2 then *average* the
# N gradients, which would leave the result N^-1/2 times the single-process gradient
# on the same global batch. Every parameter-gradient scale is therefore multiplied by
# N^1/2 (docs/rules.md, "Decisions where the rules are silent"; docs/distributed.md).
_data_parallel_size: int | None = None


def set_data_parallel_size(size: int | None) -> None:
    """The number of ranks whose gradients DDP / FSDP2 average (default: the world size
    of the default process group, 1 without one). Set it when tensor or pipeline
    parallelism makes the data-parallel group smaller than the world; ``None`` resets."""
    global _data_parallel_size
    if size is not None and size < 1:
        raise ValueError(f"data-parallel size must be >= 1, got {size}")
    _data_parallel_size = size


def data_parallel_size() -> int:
    if _data_parallel_size is not None:
        return _data_parallel_size
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _dp() -> float:
    """N^1/2: what averaging over N data-parallel ranks takes away from a weight grad."""
    return data_parallel_size() ** 0.5


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
) -> Tensor:
    """Linear rule: F.linear(x, W, b) * out_scale; x grad * grad_input_scale, W, b grads * B^-1/2."""
    # The forward scale is folded into the weight and bias: x (sW)^T + sb = s (x W^T + b).
    # It then multiplies the [out, in] weight instead of the [tokens, out] activation,
    # which costs nothing measurable (the activation multiply would be one more pass
    # over memory that Inductor cannot fuse into the matmul). Folding also puts s into
    # x's gradient (g sW), so x's backward scale is grad_input_scale / out_scale: 1, no
    # op at all, for hidden linears whose scales are tied. W's and b's gradients are
    # unchanged: B^-1/2 times the gradient at the unscaled output, as in U.linear.
    param_scale = _rows(x) ** -0.5 * _dp()
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
) -> Tensor:
    """Linear rule for a weight used through ``torch.einsum(equation, x, W)`` (or W, x):
    the scale folded into W as in :func:`linear`; W's gradient * B^-1/2, where B is the
    number of times each weight entry is used (the product of x's letters W lacks)."""
    subs = equation.replace(" ", "").split("->")[0].split(",")
    x_subs, w_subs = (subs[1], subs[0]) if weight_first else (subs[0], subs[1])
    rows = math.prod(n for c, n in zip(x_subs, x.shape, strict=True) if c not in w_subs)
    x = scale_bwd(x, grad_input_scale / out_scale)
    weight = _scale(weight, out_scale, rows**-0.5 * _dp())
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
    **kwargs: Any,
) -> Tensor:
    """Linear rule for MoE experts, ``op(x[S, in], W[E, in, out], offs)``: each expert is
    a linear with its own fans, so the scales are :func:`linear`'s, folded into W; W's
    gradient * (rows per expert)^-1/2, the S rows shared evenly by E experts (as routed
    at init), since each expert's gradient sums over its own rows only."""
    rows_per_expert = _rows(x) / weight.shape[0]
    x = scale_bwd(x, grad_input_scale / out_scale)
    weight = _scale(weight, out_scale, rows_per_expert**-0.5 * _dp())
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
    x: Tensor, weight: Tensor, bias: Tensor | None, grad_input_scale: float, transposed: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The linear rule's backward-only scales on (x, W[out, in], b), for a matmul whose
    output is then scaled by ``scale_fwd`` (the FP8 linear: its casts need W at unit
    scale, so the forward scale cannot be folded into the weight there)."""
    # As U.linear: the bias sits inside the forward scale (the whole output is scaled)
    # and its gradient gets the weight's B^-1/2, not out_scale.
    param_scale = _rows(x) ** -0.5 * _dp()
    x = scale_bwd(x, grad_input_scale)
    weight = scale_bwd(weight, param_scale)
    if bias is not None:
        bias = scale_bwd(bias, param_scale)
    # transposed: stored [in, out] (HF GPT-2 Conv1D, addmm(b, x, W)).
    return x, weight.t() if transposed else weight, bias


def embedding(indices: Tensor, weight: Tensor, padding_idx: int | None = None) -> Tensor:
    """Embedding rule: plain lookup; weight grad * (V / num_indices)^1/2."""
    weight = scale_bwd(weight, (weight.shape[0] / indices.numel()) ** 0.5 * _dp())
    return F.embedding(indices, weight, padding_idx)


def param_grad_scale(weight: Tensor, activation: Tensor) -> Tensor:
    """Norm gain/bias rule: grad * (weight.numel() / activation.numel())^1/2 = (d / numel)^1/2."""
    return scale_bwd(weight, (weight.numel() / activation.numel()) ** 0.5 * _dp())


def _norm_params(
    weight: Tensor | None, bias: Tensor | None, x: Tensor
) -> tuple[Tensor | None, Tensor | None]:
    """A norm's gain and bias with their gradient scale (either may be None)."""
    return (None if weight is None else param_grad_scale(weight, x),
            None if bias is None else param_grad_scale(bias, x))


def broadcast_param(param: Tensor, other: Tensor) -> Tensor:
    """A parameter added as is (a learned position table): grad * (numel / broadcast numel)^1/2.

    Broadcasting adds the gradients of every copy (each batch row); like the embedding
    rule's (V / indices)^1/2, this brings the sum of those unit gradients back to unit.
    """
    n = math.prod(torch.broadcast_shapes(param.shape, other.shape))
    return scale_bwd(param, (param.numel() / n) ** 0.5 * _dp())


def expand_param(param: Tensor, sizes: Sequence[int]) -> Tensor:
    """``param.expand(sizes)`` (a cls / register token copied over the batch); the copies'
    gradients are scaled by (numel / expanded numel)^1/2 before they add up."""
    out = param.expand(*sizes)
    return scale_bwd(out, (param.numel() / out.numel()) ** 0.5 * _dp())


def pick(x: Tensor, dim: int, index: int) -> Tensor:
    """Pick rule: ``x.select(dim, index)``; x grad * sqrt(n), n = x.shape[dim].

    The gradient reaches one of n positions, so its RMS over x is 1/sqrt(n) of the
    output's; as for pooling this edge feeds a head (a cut edge), and the backward
    scale brings it back to unit.
    """
    return scale_bwd(x, x.shape[dim] ** 0.5).select(dim, index)


def max_pool(x: Tensor, op: str, kernel_size: Any, stride: Any = None, *args: Any) -> Tensor:
    """Max-pool rule: ``F.max_pool{1,2,3}d`` as is (forward 1: it picks an O(1) input);
    x grad * sqrt(prod(stride)): as for :func:`pick`, the gradient reaches one input of
    each window, about one in prod(stride) of them."""
    k = int(op[-2])
    step = stride if stride else kernel_size  # F's default: stride = kernel
    n = math.prod(step if isinstance(step, (list, tuple)) else [step] * k)
    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[k]
    return pool(scale_bwd(x, n**0.5), kernel_size, stride or None, *args)


def mean_over(x: Tensor, op: str, *args: Any) -> Tensor:
    """Average rule: op(x, *args) as is (forward 1); x grad * sqrt(n), n values averaged.

    ``op``: avg_pool{1,2,3}d, adaptive_avg_pool{1,2,3}d (F's, with their arguments) or
    mean (``torch.mean(x, dim, keepdim)``); n (read at call time, as sizes may vary) is
    the kernel, the input / output positions, or the reduced axes' sizes.
    """
    # Appendix B's independent inputs would give x sqrt(n) forward and x n backward.
    # Pooled features share a mean (conv features after ReLU, neighbouring tokens),
    # which their average keeps: there x sqrt(n) would grow the output by sqrt(n), so
    # the forward stays 1 (never above the input's RMS). Backward, the weights below
    # sum the one gradient broadcast to n positions: coherently (x n) for features
    # sharing a mean, incoherently (x sqrt(n)) for independent ones. x sqrt(n) makes
    # the first unit and leaves the second at n^-1/2: low, never large (docs/rules.md).
    if op == "mean":
        dims = args[0] if isinstance(args[0], (list, tuple)) else [args[0]]
        n = math.prod(x.shape[d] for d in dims)
    elif op.startswith("adaptive"):
        k = int(op[-2])
        sizes = args[0] if isinstance(args[0], (list, tuple)) else [args[0]] * k
        out = [s if s is not None else x.shape[-k + i] for i, s in enumerate(sizes)]
        n = math.prod(x.shape[-k:]) / math.prod(out)
    else:
        k = int(op[-2])
        kernel = args[0] if isinstance(args[0], (list, tuple)) else [args[0]] * k
        n = math.prod(kernel)
    return _AVERAGES[op](scale_bwd(x, n**0.5), *args)


def layer_norm(
    x: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """Norm rule: plain layer_norm; gain and bias grads * (d / numel)^1/2."""
    weight, bias = _norm_params(weight, bias, x)
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
) -> Tensor:
    """Norm rule: plain batch_norm (statistics per channel, dim 1); gain and bias grads
    * (C / numel)^1/2; ``training`` is the module's flag at call time."""
    weight, bias = _norm_params(weight, bias, x)
    return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)


def group_norm(
    x: Tensor, num_groups: int, weight: Tensor | None = None, bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """Norm rule: plain group_norm; gain and bias grads * (C / numel)^1/2."""
    weight, bias = _norm_params(weight, bias, x)
    return F.group_norm(x, num_groups, weight, bias, eps)


def rms_norm(
    x: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
) -> Tensor:
    """Norm rule: plain rms_norm; gain grad * (d / numel)^1/2."""
    # PyTorch's kernel and eps default (dtype eps), where U.rms_norm hand-computes
    # x / sqrt(mean(x^2) + 1e-5) in fp32: same function, rounding-level differences.
    if weight is not None:
        weight = param_grad_scale(weight, x)
    return F.rms_norm(x, tuple(normalized_shape), weight, eps)


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


# -- attention and softmax -------------------------------------------------------------
def attention_scales(
    d_head: int, seq_len: int, *, causal: bool, mult: float = 1.0, dropout_p: float = 0.0
) -> tuple[float, float]:
    """SDPA rule: (mult/d_head, s = sqrt(1-p) / interp(alpha, sqrt((ln S or 1)/S), 1))."""
    # As U.scaled_dot_product_attention: S is the key/value length (value.shape[-2]),
    # alpha = 1 / (1 + 4 d_head / mult^2); dropout enters only as sqrt(1 - p).
    # Causal with S == 1 (one key: the output is v itself) would give ln 1 = 0 and a
    # math error in the reference; it gets s = 1 here (the non-causal lower limit, 1).
    lower = ((_ln(seq_len) if causal and seq_len != 1 else 1) / seq_len) ** 0.5
    alpha = 1 / (1 + 4 * d_head / mult**2)
    s = (1 - dropout_p) ** 0.5 / log_interp(alpha, lower=lower, upper=1.0)
    return mult / d_head, s


def attention_output_scale(
    d_head: int, seq_len: int, *, causal: bool, mult: float = 1.0, dropout_p: float = 0.0
) -> float:
    """The SDPA rule's s alone, for hand-written attention (see ``attention_scales``)."""
    return attention_scales(d_head, seq_len, causal=causal, mult=mult, dropout_p=dropout_p)[1]


def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    *,
    mult: float = 1.0,
    enable_gqa: bool = False,
    training: bool = True,
    causal_mask: bool = False,
    kv_group: int = 1,
) -> Tensor:
    """SDPA rule: logits * mult/d_head (muP 1/d), output * s, q, k, v grads * s.

    ``training=False`` turns a captured ``dropout_p`` off (what models do in eval).
    ``causal_mask=True`` says ``attn_mask`` is the causal mask: ``s`` is then the causal
    one (the reference keys it on ``is_causal`` only; an explicit causal mask is the
    same attention, so it gets the same scale). ``kv_group``: query heads per k/v
    head under grouped-query attention; the k/v gradients sum over the group, so they
    get a further ``kv_group^-1/2`` (1 gives the reference's op).
    """
    if not training:
        dropout_p = 0.0
    # d_head and S from v, as the reference. Standard models give q, k and v one head
    # size; were q/k's to differ (e.g. MLA), mult/d_head would still use v's, as there.
    logit_scale, s = attention_scales(
        v.shape[-1], v.shape[-2], causal=is_causal or causal_mask, mult=mult, dropout_p=dropout_p
    )
    kv_scale = s if kv_group == 1 else s * kv_group**-0.5
    q, k, v = scale_bwd(q, s), scale_bwd(k, kv_scale), scale_bwd(v, kv_scale)
    out = F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=attn_mask,
        dropout_p=dropout_p,
        is_causal=is_causal,
        scale=logit_scale,
        enable_gqa=enable_gqa,
    )
    return scale_fwd(out, s)


def softmax(
    x: Tensor, dim: int, *, mult: float = 1.0, dtype: torch.dtype | None = None, tied: bool = True
) -> Tensor:
    """Softmax rule: softmax(mult x) * n^(1-a/2), a = 1/(1+4/mult^2); x grad tied (or (n/mult)^..)."""
    # Default tied, as the reference (constraint="to_output_scale"): the rules table's
    # untied grad scale (n/mult)^(1-a/2) is what constraint=None gives (tied=False).
    n = x.shape[dim]
    a = 1 / (1 + 4 / mult**2)
    out_scale = log_interp(a, lower=n, upper=n**0.5)
    grad_scale = out_scale if tied else log_interp(a, lower=n / mult, upper=(n / mult) ** 0.5)
    x = scale_bwd(x, grad_scale)
    y = F.softmax(x if mult == 1 else x * mult, dim=dim, dtype=dtype)
    return scale_fwd(y, out_scale)


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


def matmul(a: Tensor, b: Tensor, *, tied: bool = True) -> Tensor:
    """Matmul rule [M,K]@[K,N]: out * K^-1/2; grads tied, K^-1/2 (or left N^-1/2, right M^-1/2)."""
    # Default tied, as U.matmul's to_output_scale constraint and the rules' "tied to
    # forward by default"; tied=False gives the table's untied grad scales.
    out_scale = a.shape[-1] ** -0.5
    if tied:
        left_scale = right_scale = out_scale
    else:
        left_scale = (b.shape[-1] if b.dim() > 1 else 1) ** -0.5
        right_scale = (a.shape[-2] if a.dim() > 1 else 1) ** -0.5
    return scale_fwd(torch.matmul(scale_bwd(a, left_scale), scale_bwd(b, right_scale)), out_scale)


# -- loss ------------------------------------------------------------------------------
def cross_entropy(
    logits: Tensor,
    target: Tensor,
    *,
    mult: float = 1.0,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Cross-entropy rule: CE(mult logits); logits grad * V/sqrt(V-1); mean divides the value only."""
    # As U.cross_entropy: the forward multiplier's gradient is not applied (scale_fwd),
    # and the loss is a sum whose *value* is divided by the row count in the forward
    # pass only, so d loss / d logit = (softmax - onehot) * V/sqrt(V-1), no 1/rows.
    # One difference: the reference divides by all rows (logits.shape[0]), including
    # rows whose target is ignore_index; here the divisor is PyTorch's (the number of
    # non-ignored targets), so the loss value equals F.cross_entropy's at mult = 1.
    # Identical numbers when no target is ignored.
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"cross_entropy: unknown reduction {reduction!r}")
    # Classes sit on dim 1 for [N, C, ...] logits, as in F.cross_entropy.
    vocab = logits.shape[1] if logits.dim() > 1 else logits.shape[0]
    logits = _scale(logits, fwd_scale=mult, bwd_scale=vocab / (vocab - 1) ** 0.5)
    loss = F.cross_entropy(
        logits,
        target,
        ignore_index=ignore_index,
        reduction="sum" if reduction == "mean" else reduction,
        label_smoothing=label_smoothing,
    )
    if reduction != "mean":
        return loss
    if target.is_floating_point():  # class probabilities: every row counts
        return scale_fwd(loss, 1 / (logits.numel() // vocab))
    # Data-dependent count: the forward-only scale is a 0-d tensor here.
    return scale_fwd(loss, (target != ignore_index).sum().to(loss.dtype).reciprocal())


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
    threshold), quick_gelu, gelu (approximate), silu, relu2, elu (alpha), mish,
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
) -> Tensor:
    """Conv rule (1-3-D): conv(x, W, b) * out_scale; x grad * grad_input_scale; W, b grads * B^-1/2.

    B = N * prod(output spatial sizes). Scales as a linear with fan_in = C_in/groups *
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
    # and W's, b's gradients get B^-1/2 (times the data-parallel factor).
    param_scale = _conv_rows(x, weight, stride, padding, dilation) ** -0.5 * _dp()
    x = scale_bwd(x, grad_input_scale / out_scale)
    weight = _scale(weight, out_scale, param_scale)
    if bias is not None:
        bias = _scale(bias, out_scale, param_scale)
    return _CONVS[nd](x, weight, bias, stride, padding, dilation, groups)


# -- averages --------------------------------------------------------------------------
_AVERAGES: dict[str, Callable[..., Tensor]] = {
    "avg_pool1d": F.avg_pool1d,
    "avg_pool2d": F.avg_pool2d,
    "avg_pool3d": F.avg_pool3d,
    "adaptive_avg_pool1d": F.adaptive_avg_pool1d,
    "adaptive_avg_pool2d": F.adaptive_avg_pool2d,
    "adaptive_avg_pool3d": F.adaptive_avg_pool3d,
    "mean": torch.mean,
}
