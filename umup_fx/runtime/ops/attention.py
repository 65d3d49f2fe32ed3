"""Attention (rules §3): SDPA with u-muP's scales, a stand-alone softmax, and the
matmul of two activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from umup_fx.runtime.ops.scaling import (
    _ln,
    log_interp,
    scale_bwd,
    scale_fwd,
)


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
    kv_group: float = 1,
    seq_len: int | None = None,
) -> Tensor:
    """SDPA rule: logits * mult/d_head (muP 1/d), output * s, q, k, v grads * s.

    ``seq_len``: the reference key length S of ``s``, fixed at transform time, so a
    position's output does not depend on how many keys follow it (None: this call's).
    ``training=False`` turns a captured ``dropout_p`` off (what models do in eval);
    ``s`` keeps its ``sqrt(1 - p)`` either way, so eval output = train output's mean.
    ``causal_mask=True`` says ``attn_mask`` is the causal mask: ``s`` is then the causal
    one (the reference keys it on ``is_causal`` only; an explicit causal mask is the
    same attention, so it gets the same scale). ``kv_group``: query heads per k/v
    head under grouped-query attention, times S_q / S_k where fewer queries than keys
    attend (an attention-pooling head); the k/v gradients sum over the queries each key
    serves, so they get a further ``kv_group^-1/2`` (1 gives the reference's op).
    """
    # d_head and S from v, as the reference. Standard models give q, k and v one head
    # size; were q/k's to differ (e.g. MLA), mult/d_head would still use v's, as there.
    logit_scale, s = attention_scales(
        v.shape[-1], v.shape[-2] if seq_len is None else seq_len,
        causal=is_causal or causal_mask, mult=mult, dropout_p=dropout_p,
    )
    if not training:  # after s: dropout's sqrt(1-p) stays in eval (rules §3, Dropout)
        dropout_p = 0.0
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
    x: Tensor, dim: int, *, mult: float = 1.0, dtype: torch.dtype | None = None, tied: bool = True,
    n: int | None = None,
) -> Tensor:
    """Softmax rule: softmax(mult x) * n^(1-a/2), a = 1/(1+4/mult^2); x grad tied (or (n/mult)^..).

    ``n``: the reference size of ``dim`` fixed at transform time (None: this call's)."""
    # Default tied, as the reference (constraint="to_output_scale"): the rules table's
    # untied grad scale (n/mult)^(1-a/2) is what constraint=None gives (tied=False).
    n = x.shape[dim] if n is None else n
    a = 1 / (1 + 4 / mult**2)
    out_scale = log_interp(a, lower=n, upper=n**0.5)
    grad_scale = out_scale if tied else log_interp(a, lower=n / mult, upper=(n / mult) ** 0.5)
    x = scale_bwd(x, grad_scale)
    y = F.softmax(x if mult == 1 else x * mult, dim=dim, dtype=dtype)
    return scale_fwd(y, out_scale)




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
