"""The two scale primitives every unit-scaled op is built from, and the numbers
they need: log-linear interpolation, rows seen by a weight, the data-parallel size.

Scales enter through exactly two primitives, :func:`scale_fwd` (forward only) and
:func:`scale_bwd` (backward only), both built on one ``autograd.Function``. Every op is
the plain PyTorch op with these applied around it, so the unscaled numerics (kernels,
dtypes, SDPA backends) stay PyTorch's own.

Callers pass only numbers that are fixed for a model (fan-in, fan-out, tau, the alpha
multipliers) and, for the scales the rules write with a data size (rows of a linear,
looked-up indices, attention's key length, the loss's rows), a *reference size* fixed
at transform time from the example inputs (rules §3, "Reference sizes"). A rewritten
graph's scales are therefore constants: a graph accepts any batch size / sequence
length, a position's output does not depend on how many positions follow it, and a
weight gradient is linear in the loss, so any split of a batch adds up to the full
batch's gradient. Called without a reference size (``rows=None`` etc.), an op reads
the size from its tensors at run time, as the reference library does. Under
``torch.compile(dynamic=True)`` those sizes are SymInts and the scales SymFloats; the
scale arithmetic below therefore uses only ``**`` and log2 (``math.log2`` under Dynamo,
torch's symbolic log2 under AOTAutograd / make_fx), which stay symbolic: ``math.log`` /
``math.exp`` would specialise the graph to one size and recompile for every new one.

Where the reference library (``unit-scaling`` 0.3.5, ``unit_scaling.functional``)
differs from ``docs/rules.md``, the op's comment says which one it follows and why.

Outputs of :func:`scale_bwd` (and of ops whose forward scale is 1) may alias their input
(zero-copy); like any custom-Function output they must not be modified in place.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor

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


def _rows(x: Tensor, reference: int | None = None) -> int:
    """Rows a weight sees (B in the rules): the reference rows fixed at transform time,
    else every position of every batch element of this call."""
    return x.numel() // x.shape[-1] if reference is None else reference


# -- data parallelism (deprecated) --------------------------------------------------
# Weight-gradient scales used to read the rows at run time, and were multiplied by
# N^1/2 for N data-parallel ranks to undo DDP's average. With reference sizes fixed at
# transform time every scale is a constant and the loss's backward is linear (rules
# §3), so N ranks' averaged gradients equal one process's on the global batch without
# any factor. These two functions stay for old callers and do nothing.
def set_data_parallel_size(size: int | None) -> None:
    """Deprecated, no effect: gradients no longer depend on the data-parallel size."""
    warnings.warn(
        "umup_fx.runtime.ops.set_data_parallel_size is deprecated and has no effect: "
        "u-muP's gradient scales are fixed at transform time, so DDP / FSDP averaging "
        "already gives the single-process gradient (docs/distributed.md).",
        DeprecationWarning,
        stacklevel=2,
    )


def data_parallel_size() -> int:
    """Deprecated: always 1 (no gradient scale depends on the data-parallel size)."""
    return 1
