"""The loss (rules §3): cross-entropy with u-muP's logit and gradient scales."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from umup_fx.runtime.ops.scaling import (
    _scale,
    scale_fwd,
)


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
