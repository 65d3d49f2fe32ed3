"""Rewrite attention (§3): SDPA, hand-written attention, stand-alone softmax.

``scaled_dot_product_attention`` becomes ``ops.scaled_dot_product_attention``: logits
``alpha_attn / d_head`` (muP's 1/d replaces the model's 1/sqrt(d) or ``scale=``), output
and q/k/v gradients times ``s`` (rules §3), with ``s`` at the reference key length (the
example inputs'), a constant: a position's output does not depend on later positions. A hand-written attention keeps its own ops
(mask, softmax, dropout): its logit constant (or ``baddbmm``'s ``alpha``, whose added
bias, Bloom's ALiBi, stays as written) becomes ``alpha_attn / d_head``, q, k^T and
v get the backward scale ``s`` and the ``@ v`` output the forward scale ``s``, which is
the same computation as the SDPA rule. Its mask is taken as causal (decoders' masks
are; the ln S term of ``s`` then applies). An SDPA given an explicit mask gets the
causal ``s`` when that mask, evaluated at the example sizes, is the causal mask.
Under grouped-query attention the k/v gradients get a further ``group^-1/2``: each
k/v head serves ``group`` query heads and their gradients add; likewise a further
``(S_k / S_q)^1/2`` where the reference query length S_q differs from the key length
S_k (learned-query pooling, cross-attention; rules.md "Learned queries"). A softmax
outside attention gets the
stand-alone softmax rule with ``alpha_attn_softmax``.

Baked-in dropout (``dropout_p`` captured in train mode) follows ``module.training`` at
call time through the graph's training flag.

Reads: ``umup.rule`` ("sdpa", "attention", "softmax"), ``umup.attention``; ``val``
shapes of q/k/v; graph key ``plan`` (hparams).
Writes: swaps SDPA and softmax nodes; inserts scale nodes around hand-written attention.
Fails when: a hand-written attention's head size is not a static number (AnalysisError).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from umup_fx import meta, rules
from umup_fx.errors import AnalysisError
from umup_fx.runtime import ops

from ._graph import BADDBMM, MULS, TRANSPARENT, where
from ._graph import ops as aten_ops
from ._rewrite import (
    ancestors,
    arg,
    example_size,
    insert_call,
    nodes_with_rule,
    shape_of,
    swap,
    training_flag,
    wrap_output,
)

_aten = torch.ops.aten


_CPU = torch.device("cpu")


def mask_is_causal(gm: fx.GraphModule, mask: fx.Node) -> bool:
    """True when ``mask`` is built from shapes alone and equals the causal mask.

    Models often pass SDPA an explicit causal mask instead of ``is_causal=True`` (Hugging
    Face builds one from ``arange`` comparisons). The SDPA rule's ln S term is for
    causal attention, so the mask's subgraph is evaluated at the example sizes; a mask
    that reads input *values* (padding) or parameters is not assumed causal.
    """
    needed = ancestors(mask) | {mask}
    env: dict[fx.Node, object] = {}
    try:
        for n in gm.graph.nodes:
            if n not in needed:
                continue
            if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.SymInt):
                env[n] = example_size(n.meta["val"])  # a size as an input (Dynamo's graphs)
            elif n.op == "placeholder":
                if any(u in needed and u.target is not _aten.sym_size.int for u in n.users):
                    return False  # the mask depends on this input's values
                val = n.meta["val"]
                env[n] = torch.empty([example_size(d) for d in val.shape], dtype=val.dtype)
            elif n.op == "call_function":
                args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: env[a])
                # The capture's meta device stands for "the model's": evaluate on the CPU.
                args, kwargs = pytree.tree_map_only(torch.device, lambda _: _CPU, (args, kwargs))
                env[n] = n.target(*args, **kwargs)
            else:
                return False
        value = env[mask]
    except Exception:  # noqa: BLE001 - anything unevaluable is simply "not known causal"
        return False
    if not isinstance(value, torch.Tensor) or value.dim() < 2:
        return False
    allowed = value if value.dtype == torch.bool else value == 0
    sq, sk = allowed.shape[-2:]
    causal = torch.ones(sq, sk, dtype=torch.bool, device=allowed.device).tril(sk - sq)
    return bool(torch.equal(allowed, causal.expand_as(allowed)))


_REPEATS = aten_ops("repeat_interleave.self_int", "repeat_interleave.self_Tensor", "repeat")


def kv_group(q: fx.Node, k: fx.Node, enable_gqa: bool) -> int:
    """How many query heads share each key/value head (grouped-query attention).

    With ``enable_gqa`` SDPA broadcasts k/v itself; otherwise models repeat them first
    (HF ``repeat_kv``: unsqueeze, expand, reshape; or ``repeat_interleave``), which
    the walk back from k through views and repeats finds by its smaller head axis.
    """
    heads = shape_of(q)[1] if len(shape_of(q)) == 4 else None
    if not isinstance(heads, int):
        return 1
    node: Any = k
    for _ in range(8):
        shape = shape_of(node)
        if len(shape) < 4 or not isinstance(shape[1], int):
            return 1
        if shape[1] < heads and heads % shape[1] == 0:
            return heads // shape[1]
        if enable_gqa or node.op != "call_function" or node.target not in TRANSPARENT | _REPEATS:
            return 1
        node = node.args[0]
    return 1


def scale_sdpa(gm: fx.GraphModule) -> PassResult:
    """Swap SDPA for the unit-scaled SDPA (logits alpha/d_head, output and grads x s).

    An explicit mask that is the causal mask (``mask_is_causal``) gets the causal ``s``.
    """
    mult = meta.graph_meta(gm)[meta.PLAN].hparams.attn_softmax_mult
    nodes = nodes_with_rule(gm, rules.SDPA)
    for node in nodes:
        q, k, v = node.args[:3]
        dropout_p = arg(node, "dropout_p", 0.0)
        gqa = bool(arg(node, "enable_gqa", False))
        kwargs = {"mult": mult, "enable_gqa": gqa,
                  "kv_group": kv_group(q, k, gqa) / _kv_per_query(q, k, -2),
                  "seq_len": _reference_len(v, -2)}
        mask, is_causal = arg(node, "attn_mask"), bool(arg(node, "is_causal", False))
        if isinstance(mask, fx.Node) and not is_causal and mask_is_causal(gm, mask):
            kwargs["causal_mask"] = True
        if dropout_p:
            kwargs["training"] = training_flag(gm)
        swap(
            node,
            ops.scaled_dot_product_attention,
            (q, k, v, mask, dropout_p, is_causal),
            kwargs,
        )
    return PassResult(gm, bool(nodes))


def scale_manual_attention(gm: fx.GraphModule) -> PassResult:
    """Give hand-written ``softmax(c q k^T) v`` the SDPA rule, keeping its ops."""
    mult = meta.graph_meta(gm)[meta.PLAN].hparams.attn_softmax_mult
    by_name = {n.name: n for n in gm.graph.nodes}
    softmaxes = nodes_with_rule(gm, rules.ATTENTION)
    for softmax in softmaxes:
        pattern = meta.get(softmax, meta.ATTENTION)
        qk, av = by_name[pattern["qk"]], by_name[pattern["av"]]
        first = 1 if qk.target in BADDBMM else 0  # baddbmm(bias, q, k^T, alpha=c)
        q, k_t = qk.args[first:first + 2]
        v = av.args[1]
        d_head = shape_of(v)[-1] if shape_of(v) else None
        if not isinstance(d_head, int):
            raise AnalysisError(
                f"The attention at {where(qk)} has a head size that is not a fixed number "
                f"({d_head}); u-muP's 1/d_head logit scale needs it static."
            )
        dropout = by_name.get(pattern["dropout"]) if pattern["dropout"] else None
        p = float(arg(dropout, "p", 0.0)) if dropout is not None else 0.0
        if dropout is not None:
            dropout.update_arg(2, training_flag(gm, arg(dropout, "train", True)))
        # s from the key length (k^T's last axis) at the example inputs; read at run
        # time only where the capture has no example value for it.
        seq_len = _reference_len(k_t, -1)
        if seq_len is None:
            seq_len = insert_call(gm, qk, _aten.sym_size.int, (k_t, -1))
        s = insert_call(
            gm, qk, ops.attention_output_scale, (d_head, seq_len),
            {"causal": pattern["masked"], "mult": mult, "dropout_p": p},
        )
        qk.update_arg(first, insert_call(gm, qk, ops.scale_bwd, (q, s), like=q))
        ratio = _kv_per_query(q, k_t, -1)
        s_kv = s if ratio == 1 else insert_call(gm, qk, operator.mul, (s, ratio**0.5))
        qk.update_arg(first + 1, insert_call(gm, qk, ops.scale_bwd, (k_t, s_kv), like=k_t))
        av.update_arg(1, insert_call(gm, av, ops.scale_bwd, (v, s_kv), like=v))
        logit_scale = mult / d_head
        if pattern["scale"]:
            scale = by_name[pattern["scale"]]
            value = logit_scale if scale.target in MULS else 1 / logit_scale
            scale.update_arg(1, value)
            if first:
                qk.update_kwarg("alpha", 1.0)
        elif first:  # the model's own alpha (1/sqrt(d_head)) becomes alpha_attn / d_head;
            qk.update_kwarg("alpha", logit_scale)  # its bias (ALiBi) is added as written
        else:
            wrap_output(gm, qk, operator.mul, logit_scale)
        wrap_output(gm, av, ops.scale_fwd, s)
    return PassResult(gm, bool(softmaxes))


def scale_softmax(gm: fx.GraphModule) -> PassResult:
    """Swap stand-alone softmaxes for the unit-scaled softmax."""
    mult = meta.graph_meta(gm)[meta.PLAN].hparams.attn_softmax_mult
    nodes = nodes_with_rule(gm, rules.SOFTMAX)
    for node in nodes:
        x, dim = node.args[:2]
        dtype = arg(node, "dtype")
        if arg(node, "half_to_float", False):
            dtype = torch.float32
        swap(node, ops.softmax, (x, dim), {"mult": mult, "dtype": dtype,
                                           "n": _reference_len(x, dim)})
    return PassResult(gm, bool(nodes))


def _kv_per_query(q: fx.Node, k: fx.Node, k_dim: int) -> float:
    """S_k / S_q at the reference sizes (1 for self-attention, or where either is not
    known): each key serves S_q queries instead of S_k, so its gradient, a sum over them,
    is ``(S_q / S_k)^1/2`` of self-attention's (one learned query over S keys: S^-1/2)."""
    s_q, s_k = _reference_len(q, -2), _reference_len(k, k_dim)
    return s_k / s_q if isinstance(s_q, int) and isinstance(s_k, int) and s_q and s_q != s_k else 1


def _reference_len(node: fx.Node, dim: int) -> int | None:
    """The size of ``node``'s axis ``dim`` at the example inputs: the reference length
    the rule's scale is fixed at (rules §3, "Reference sizes")."""
    shape = shape_of(node)
    return example_size(shape[dim]) if shape else None
