"""The loss (rules §3): cross-entropy with u-muP's logit and gradient scales."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from umup_fx.runtime.ops.scaling import (
    _scale,
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
    reference_rows: int | None = None,
    divided: bool = False,
) -> Tensor:
    """Cross-entropy rule: F.cross_entropy(mult logits), the multiplier forward-only.

    In a rewritten graph (``reference_rows`` given: the loss's rows at the example
    inputs) the logit gradient is also * V/sqrt(V-1), and a mean's * reference_rows: the
    standard mean's gradient (1/count, in both directions) times constants, unit scale
    at the reference batch and linear in the loss. Outside a model (None) the backward
    is F.cross_entropy's: a transformed model whose logits leave it unconsumed carries
    those constants in its readout (rules §3, Cross-entropy). ``divided``: a sum the
    graph then divides by a count (HF's ``sum / num_items_in_batch``), a mean whose
    divisor comes later: it gets the mean's * reference_rows too.
    """
    # As U.cross_entropy: the forward multiplier's gradient is not applied (scale_fwd)
    # and the logit gradient gets V/sqrt(V-1). Unlike it, a mean is PyTorch's mean (over
    # non-ignored targets) in the backward too, with the fixed reference_rows in place of
    # the reference library's run-time rows: at the reference batch, with nothing ignored,
    # the numbers are the library's; at any other size the gradient is the mean's, so
    # micro-batches weighted by their share of the tokens add up to the full batch's.
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"cross_entropy: unknown reduction {reduction!r}")
    # Classes sit on dim 1 for [N, C, ...] logits, as in F.cross_entropy.
    vocab = logits.shape[1] if logits.dim() > 1 else logits.shape[0]
    grad_scale = 1.0
    if reference_rows is not None:
        mean = reduction == "mean" or (divided and reduction == "sum")
        grad_scale = loss_grad_scale(vocab) * (reference_rows if mean else 1)
    logits = _scale(logits, fwd_scale=mult, bwd_scale=grad_scale)
    return F.cross_entropy(
        logits, target, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing,
    )


def binary_cross_entropy_with_logits(
    logits: Tensor,
    target: Tensor,
    *,
    reduction: str = "mean",
    reference_rows: int | None = None,
) -> Tensor:
    """Binary cross-entropy with logits as the two-class cross-entropy on (0, z): its
    logit gradient sigmoid(z) - y (RMS 1/2 at init) gets V/sqrt(V-1) = 2 at V = 2, and a
    mean's * reference_rows (the logits' elements at the example inputs), as
    ``cross_entropy`` (rules.md, "Binary cross-entropy")."""
    if reference_rows is not None:
        scale = loss_grad_scale(2) * (reference_rows if reduction == "mean" else 1)
        logits = _scale(logits, bwd_scale=scale)
    return F.binary_cross_entropy_with_logits(logits, target, reduction=reduction)


def loss_grad_scale(vocab: int) -> float:
    """V/sqrt(V-1): makes softmax - onehot over V classes unit scale (1 for one class)."""
    return vocab / (vocab - 1) ** 0.5 if vocab > 1 else 1.0
