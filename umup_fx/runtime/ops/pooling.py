"""Picks and averages over data dims: a head's cls pick, max pooling, means."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from umup_fx.runtime.ops.scaling import (
    scale_bwd,
)


def pick(x: Tensor, dim: int, index: int, n: int | None = None) -> Tensor:
    """Pick rule: ``x.select(dim, index)``; x grad * sqrt(n), n = x.shape[dim] (``n``: its
    reference size fixed at transform time, None: this call's).

    The gradient reaches one of n positions, so its RMS over x is 1/sqrt(n) of the
    output's; as for pooling this edge feeds a head (a cut edge), and the backward
    scale brings it back to unit.
    """
    return scale_bwd(x, (x.shape[dim] if n is None else n) ** 0.5).select(dim, index)


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
