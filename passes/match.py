"""Match ops to u-muP rules (§3): which node gets which scaling rule.

Weight-bearing ops are matched by how a parameter enters them (never by module
class or weight layout): ``linear`` (W[out, in]), ``addmm`` / ``mm`` / ``matmul`` with a
parameter as the right operand (W[in, out], as HF GPT-2's ``Conv1D``), ``embedding``.
A hand-written attention (``q @ k^T`` times a constant, optional mask, softmax,
optional dropout, ``@ v``) is recognised as one pattern and gets SDPA's rule, and a
hand-written tanh-GELU (HF ``gelu_new``) gets the GELU rule (``approximate="tanh"``).

Reads: ``umup.param``, ``umup.norm``, ``umup.rule`` (from ``find_norms``).
Writes: ``umup.rule`` (a name from ``umup_fx.rules``), ``umup.weight`` (parameter
name) and ``umup.transposed`` on weight ops; ``umup.gelu_input`` on the output node of
a hand-written tanh-GELU; ``umup.attention`` on the softmax of a hand-written
attention: {"qk", "av", "scale", "masked", "dropout"}. Ops inside these patterns (the
GELU's pow / tanh / adds, the attention's dropout) get rule "pattern_part": the
pattern's rule covers them.
Fails when: never; unmatched ops are left for ``find_uncovered``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from umup_fx import meta, rules
from umup_fx.runtime import ops as ops_

from ._graph import (
    ADDS,
    BADDBMM,
    DIVS,
    DROPOUTS,
    MATMULS,
    MULS,
    SOFTMAXES,
    TRANSPARENT,
    consumers,
    einsum_letters,
    is_grouped_mm,
    is_tensor,
    ops,
    param_dependent,
    param_of,
    source,
)
from ._rewrite import arg

_LINEAR = ops("linear")
_ADDMM = ops("addmm")
_EMBEDDING = ops("embedding")
_SDPA = ops("scaled_dot_product_attention")
_SILU = ops("silu")
_GELU = ops("gelu")
_CE = ops("cross_entropy_loss")
_BCE = ops("binary_cross_entropy_with_logits")
_TANH = ops("tanh")
_POW = ops("pow.Tensor_Scalar")
_MASKING = ops("masked_fill.Scalar", "masked_fill.Tensor", "where.self", "add.Tensor")
_SIGMOID = ops("sigmoid")
_RELU = ops("relu")
_SQUARE = ops("square")
_MOMENTS = ops("mean.dim", "mean", "sum.dim_IntList", "sum")
_CONV = ops("conv1d", "conv2d", "conv3d", "conv1d.padding", "conv2d.padding", "conv3d.padding",
            "convolution")
_INDEX = ops("index.Tensor")
_AVG_POOLS = ops("avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
                 "adaptive_avg_pool2d", "adaptive_avg_pool3d")
_MAX_POOLS = ops("max_pool1d", "max_pool2d", "max_pool3d")
_MEAN = ops("mean.dim")
_SELECT = ops("select.int")
_EINSUM = ops("einsum")
_EXPAND = ops("expand")
_REPEAT = ops("repeat")
_CAT = ops("cat", "stack")
# Data movement a parameter used as a value may go through: views, slices, row picks.
_DATA_MOVE = (TRANSPARENT - _EXPAND) | ops("slice.Tensor", "select.int", "narrow", "index.Tensor")


def _picks_for_head(node: fx.Node, solver: Any) -> bool:
    """``x[:, i]`` on a data-sized axis (a sequence, not a number the model fixes) whose
    value a linear reads, directly or after dropout: a classifier on the cls / last token."""
    dims = meta.get(node.args[0], meta.DIMS)
    axis = node.args[1] % len(dims)
    if dims[axis].is_number or solver.kind_of(dims[axis]) != "fixed":
        return False
    readers = consumers(node)
    while readers and all(r.target in DROPOUTS or getattr(r.target, "__name__", "") == "getitem"
                          for r in readers):
        readers = [u for r in readers for u in consumers(r)]  # x[:, 0] -> dropout -> head
    return any(meta.get(u, meta.RULE) == rules.LINEAR for u in readers)


def _einsum_weight(node: fx.Node) -> tuple[list[str], str, int] | None:
    """(subscripts, output, weight index) of ``einsum(eq, x, W)`` / ``(eq, W, x)`` where W
    is a parameter whose letters are each contracted with x or kept in the output."""
    parsed = einsum_letters(node.args[0])
    operands = list(node.args[1])
    if parsed is None or len(operands) != 2:
        return None
    subs, out = parsed
    params = [i for i, t in enumerate(operands) if param_of(t)]
    if len(params) != 1:
        return None
    i = params[0]
    w, x = subs[i], subs[1 - i]
    contracted = [c for c in w if c in x and c not in out]
    kept = [c for c in w if c in out and c not in x]
    return (subs, out, i) if contracted and kept else None


def _row_lookup(node: fx.Node) -> bool:
    """``W[ids]``: an integer index tensor on the rows (axis 0) of a 2-D parameter."""
    indices = list(node.args[1])
    idx = indices[0] if len(indices) == 1 else None
    return (isinstance(idx, fx.Node) and is_tensor(idx) and not idx.meta["val"].is_floating_point()
            and source(node.args[0]).meta["val"].dim() == 2)


def _direct_use(param: fx.Node, active: set[fx.Node]) -> dict[str, str] | None:
    """How a parameter enters as a value: added (broadcast) to an activation, expanded
    over the batch, concatenated, or normalised; through views and slices. None otherwise."""
    node = param
    while len(node.users) == 1 and next(iter(node.users)).target in _DATA_MOVE:
        node = next(iter(node.users))
    if len(node.users) != 1:
        return None
    op = next(iter(node.users))
    if op.target in _EXPAND and len(op.users) == 1 and next(iter(op.users)).target in _CAT:
        return {"kind": "expand", "op": op.name, "operand": node.name}
    if op.args[0] is node and copy_sizes(op) is not None:  # learned queries / latents
        return {"kind": "expand", "op": op.name, "operand": node.name}
    if op.target in _CAT:
        return {"kind": "cat", "op": op.name, "operand": node.name}
    if meta.get(op, meta.RULE) == rules.NORM_OP and op.args[0] is node:
        # a table read through a norm (DeBERTa-v2's relative positions): the norm's input,
        # not its gain; the norm sets the output's scale (rules.md "A table read through a
        # norm is a table")
        return {"kind": "norm", "op": op.name, "operand": node.name}
    if op.target in ADDS and len(op.args) == 2:
        other = op.args[1] if op.args[0] is node else op.args[0]
        if isinstance(other, fx.Node) and other in active and param_of(other) is None:
            return {"kind": "add", "op": op.name, "operand": node.name}
    return None


def _is_square(node: object) -> bool:
    """``x.square()`` or ``x ** 2``: an elementwise square whose value is not a statistic
    (a mean or sum of squares reads it: a norm's or a variance's second moment)."""
    if not isinstance(node, fx.Node) or not (
            node.target in _SQUARE or node.target in _POW and node.args[1] == 2):
        return False
    return not any(u.target in _MOMENTS for u in consumers(node))


def _match_relu2(node: fx.Node) -> fx.Node | None:
    """``x`` if ``node`` is ``relu(x)`` squared (ReLU^2, Persimmon's ``relu2``)."""
    if not _is_square(node):
        return None
    relu = node.args[0]
    if isinstance(relu, fx.Node) and relu.target in _RELU and len(relu.users) == 1:
        return relu.args[0]
    return None


def copy_sizes(op: fx.Node) -> list[int] | None:
    """``op``'s ``expand`` sizes when it copies its input (``[1, ..., d]``) over new or
    size-1 axes only: ``q.expand(B, -1, -1)`` / ``q.repeat(B, 1, 1)`` (SigLIP's probe,
    Perceiver latents); None otherwise (a tiling of a real axis is not a copy over the
    batch)."""
    if op.target not in _EXPAND | _REPEAT:
        return None
    shape, times = list(op.args[0].meta["val"].shape), list(op.args[1])
    shape = [1] * (len(times) - len(shape)) + shape
    pairs = list(zip(shape, times, strict=False))
    if len(times) != len(shape):
        return None
    if op.target in _REPEAT:
        return [t if s == 1 else -1 for s, t in pairs] if all(
            t == 1 or s == 1 for s, t in pairs) else None
    return times if all(t in (-1, s) or s == 1 for s, t in pairs) else None


def _activation_kind(node: fx.Node) -> tuple[str, dict[str, Any]] | None:
    """(kind, kwargs) of ``ops.activation`` for an ATen nonlinearity it knows (SiLU and
    GELU have their own rules); keyword values read by schema name. A square on the
    activation path is the pointwise nonlinearity ``x^2``."""
    if node.target in _SQUARE | _POW:
        return ("square", {}) if _is_square(node) else None
    name = getattr(node.target, "_opname", None)
    if not isinstance(node.target, torch._ops.OpOverload) or name not in ops_.ACTIVATION_ARGS:
        return None
    return name, {k: arg(node, k) for k in sorted(ops_.ACTIVATION_ARGS[name])}


def _softcap_input(node: fx.Node) -> fx.Node | None:
    """``y`` if ``node`` is ``c * tanh(y / c)`` (logit soft-capping), else None."""
    if node.target not in MULS or len(node.args) != 2:
        return None
    t, c = node.args if isinstance(node.args[0], fx.Node) else node.args[::-1]
    if not (isinstance(t, fx.Node) and t.target in _TANH and isinstance(c, (int, float))):
        return None
    inner = t.args[0]
    if inner.target in DIVS and inner.args[1] == c or _times_constant(inner, 1 / c) is not None:
        return inner.args[0]
    return None


def _match_quick_gelu(node: fx.Node) -> fx.Node | None:
    """``x`` if ``node`` is ``x * sigmoid(c x)`` (c = 1.702: quick-GELU; c = 1: SiLU)."""
    if node.target not in MULS or len(node.args) != 2:
        return None
    for x, sig in (node.args, node.args[::-1]):
        if isinstance(sig, fx.Node) and sig.target in _SIGMOID and len(sig.users) == 1:
            inner = sig.args[0]
            if inner is x or _times_constant(inner, 1.702) is x:
                return x
    return None


_GATE_ACTS = {rules.SILU, rules.GELU, rules.ACTIVATION}


def _set(node: fx.Node, rule: str, **extra: Any) -> None:
    m = meta.node_meta(node)
    m[meta.RULE] = rule
    m.update(extra)


def _qk_operands(qk: fx.Node) -> tuple[Any, Any]:
    """(q, k^T) of an attention's logits op: ``q @ k^T`` or ``baddbmm(bias, q, k^T)``."""
    return tuple(qk.args[1:3]) if qk.target in BADDBMM else tuple(qk.args[:2])


def _match_attention(softmax: fx.Node, active: set[fx.Node]) -> dict[str, Any] | None:
    """softmax(mask(c * (q @ k^T))) @ v, with c a Python number, or with the logits
    ``baddbmm(bias, q, k^T, alpha=c)`` (a position bias added: ALiBi); None if not that."""
    node = source(softmax.args[0])
    scale: fx.Node | None = None
    masked = False
    for _ in range(6):
        if node.target in MATMULS | BADDBMM:
            break
        capped = _softcap_input(node)
        if capped is not None:  # Gemma 2's c * tanh(logits / c): near 1 at u-muP logits
            node = source(capped)
            continue
        if node.target in (MULS | DIVS) and not is_tensor(node.args[1]):
            scale = node
        elif node.target in _MASKING:
            # The mask side must be a constant (no parameter): logits + mask.
            others = [a for a in node.args if isinstance(a, fx.Node) and a in active]
            if len(others) != 1:
                return None
            masked = True
        else:
            return None
        node = source(next(a for a in node.args if isinstance(a, fx.Node) and a in active))
    if node.target not in MATMULS | BADDBMM:
        return None
    qk = node
    if qk.target in BADDBMM and qk.args[0] in active:  # bias + alpha q @ k^T: the bias
        return None  # (Bloom's ALiBi) must be a constant
    if not all(isinstance(a, fx.Node) and a in active for a in _qk_operands(qk)):
        return None
    if scale is None:  # the constant on q instead (nn.MultiheadAttention: (q * c) @ k^T)
        q = source(_qk_operands(qk)[0])
        if (q.target in (MULS | DIVS) and len(q.args) == 2 and isinstance(q.args[1], (int, float))
                and len(q.users) == 1):
            scale = q
    readers = consumers(softmax)
    if readers and readers[0].target in DROPOUTS:
        dropout = readers[0]
        readers = consumers(dropout)
        if readers and readers[0].target.__name__ == "getitem":
            readers = consumers(readers[0])
    else:
        dropout = None
    # One reader multiplies the values; others may read the probabilities as they are
    # (nn.MultiheadAttention returns them, averaged over heads, with need_weights=True).
    matmuls = [r for r in readers if r.target in MATMULS]
    if len(matmuls) != 1:
        return None
    av = matmuls[0]
    if source(av.args[0]) not in (softmax, dropout) and av.args[0] is not softmax:
        return None
    return {"qk": qk.name, "av": av.name, "scale": scale.name if scale else None,
            "masked": masked, "dropout": dropout.name if dropout else None}


def _times_constant(node: object, value: float) -> fx.Node | None:
    """The tensor operand of ``node`` if it is ``tensor * value`` (either order)."""
    if not (isinstance(node, fx.Node) and node.target in MULS and len(node.args) == 2):
        return None
    for t, c in (node.args, node.args[::-1]):
        if isinstance(t, fx.Node) and isinstance(c, (int, float)) and abs(c - value) < 1e-6:
            return t
    return None


def _tanh_gelu_inner(arg: object) -> tuple[fx.Node, list[fx.Node]] | None:
    """(x, inner nodes) if ``arg`` is ``sqrt(2/pi) (x + 0.044715 x^3)`` (HF ``gelu_new``)
    or its factored form ``sqrt(2/pi) x (1 + 0.044715 x x)`` (Bloom's ``bloom_gelu``)."""
    inner = _times_constant(arg, (2 / math.pi) ** 0.5)
    if inner is not None and inner.target in ADDS and len(inner.args) == 2:
        for x, cubic in (inner.args, inner.args[::-1]):
            cube = _times_constant(cubic, 0.044715)
            if cube is not None and cube.target in _POW and cube.args[0] is x and cube.args[1] == 3:
                return x, [cube, cubic, inner, arg]
    if not (isinstance(arg, fx.Node) and arg.target in MULS and len(arg.args) == 2):
        return None
    for scaled, poly in (arg.args, arg.args[::-1]):
        x = _times_constant(scaled, (2 / math.pi) ** 0.5)
        if x is None or not (isinstance(poly, fx.Node) and poly.target in ADDS
                             and 1 in poly.args and len(poly.args) == 2):
            continue
        xx = next(a for a in poly.args if isinstance(a, fx.Node))
        if xx.target in MULS and len(xx.args) == 2 and x in xx.args:
            cx = xx.args[1] if xx.args[0] is x else xx.args[0]
            if _times_constant(cx, 0.044715) is x:
                return x, [cx, xx, poly, scaled, arg]
    return None


def _match_tanh_gelu(tanh: fx.Node) -> tuple[fx.Node, fx.Node, list[fx.Node]] | None:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) written by hand (HF ``gelu_new``,
    or Bloom's factored ``x (1 + 0.044715 x x)``).

    Returns (x, the output node, the pattern's inner nodes), or None.
    """
    found = _tanh_gelu_inner(tanh.args[0])
    if found is None:
        return None
    x, inner_parts = found
    if len(tanh.users) != 1:
        return None
    one_plus = next(iter(tanh.users))
    if one_plus.target not in ADDS or 1.0 not in one_plus.args or len(one_plus.users) != 1:
        return None
    out = next(iter(one_plus.users))
    if out.target not in MULS:
        return None
    half = next((a for a in out.args if a is not one_plus), None)
    if _times_constant(half, 0.5) is not x:
        return None
    return x, out, [half, *inner_parts, tanh, one_plus]


def match_rules(gm: fx.GraphModule) -> PassResult:
    """Label each op with its u-muP rule; see the module docstring."""
    active = param_dependent(gm)
    attention_parts: set[str] = set()
    for node in gm.graph.nodes:  # hand-written tanh-GELU first: its add is no plain add
        if node.target in _TANH and node in active:
            found = _match_tanh_gelu(node)
            if found:
                x, out, parts = found
                _set(out, rules.GELU, **{meta.GELU_INPUT: x.name})
                for part in parts:
                    _set(part, rules.PATTERN_PART)
    for node in gm.graph.nodes:  # quick-GELU / x * sigmoid(x), soft-capping
        if node not in active or meta.get(node, meta.RULE) is not None:
            continue
        relu_input = _match_relu2(node)
        if relu_input is not None:
            _set(node, rules.ACTIVATION, **{meta.GELU_INPUT: relu_input.name,
                                            meta.ACTIVATION: ("relu2", {})})
            _set(node.args[0], rules.PATTERN_PART)
            continue
        x = _match_quick_gelu(node)
        if x is not None:
            sig = next(a for a in node.args if a is not x)
            kind = "silu" if sig.args[0] is x else "quick_gelu"
            _set(node, rules.ACTIVATION, **{meta.GELU_INPUT: x.name, meta.ACTIVATION: (kind, {})})
            for part in (sig, sig.args[0]) if kind == "quick_gelu" else (sig,):
                _set(part, rules.PATTERN_PART)
        elif _softcap_input(node) is not None:
            _set(node, rules.SOFTCAP)
            tanh = next(a for a in node.args if isinstance(a, fx.Node))
            _set(tanh, rules.PATTERN_PART)
            _set(tanh.args[0], rules.PATTERN_PART)
    for node in gm.graph.nodes:
        if node.op != "call_function" or meta.get(node, meta.RULE) is not None:
            continue
        t = node.target
        if t in _LINEAR and param_of(node.args[1]):
            _set(node, rules.LINEAR, **{meta.WEIGHT: param_of(node.args[1]), meta.TRANSPOSED: False})
        elif t in _ADDMM and param_of(node.args[2]):
            _set(node, rules.LINEAR, **{meta.WEIGHT: param_of(node.args[2]), meta.TRANSPOSED: True})
        elif is_grouped_mm(t) and param_of(node.args[1]):  # MoE experts: W[E, in, out]
            _set(node, rules.LINEAR, **{meta.WEIGHT: param_of(node.args[1]), meta.TRANSPOSED: True,
                                        meta.GROUPED: t._schema.name})
        elif t in MATMULS and param_of(node.args[1]) and not param_of(node.args[0]):
            _set(node, rules.LINEAR, **{meta.WEIGHT: param_of(node.args[1]), meta.TRANSPOSED: True})
        elif t in _EINSUM and _einsum_weight(node):
            subs, out, i = _einsum_weight(node)
            _set(node, rules.LINEAR, **{meta.WEIGHT: param_of(node.args[1][i]),
                                        meta.EINSUM: (subs, out, i)})
        elif param_of(node.args[0]) and (t in _EMBEDDING or t in _INDEX and _row_lookup(node)):
            _set(node, rules.EMBEDDING, **{meta.WEIGHT: param_of(node.args[0])})
        elif t in _CONV and param_of(node.args[1]):
            _set(node, rules.CONV, **{meta.WEIGHT: param_of(node.args[1])})
        elif t in (_AVG_POOLS | _MAX_POOLS) and node in active:
            _set(node, rules.POOL)
        elif t in _MEAN and node in active and not (len(node.args) > 2 and node.args[2]):
            _set(node, rules.POOL)  # keepdim=False: pooling (a norm's mean keeps dims)
        elif t in _SDPA:
            _set(node, rules.SDPA)
        elif t in SOFTMAXES and node in active:
            pattern = _match_attention(node, active)
            if pattern:
                _set(node, rules.ATTENTION, **{meta.ATTENTION: pattern})
                if pattern["dropout"]:  # the pattern's own dropout: scaled by its s
                    dropout = next(n for n in gm.graph.nodes if n.name == pattern["dropout"])
                    _set(dropout, rules.PATTERN_PART)
                attention_parts.update(v for k, v in pattern.items() if k in ("qk", "av"))
            else:
                _set(node, rules.SOFTMAX)
        elif t in _SILU and node in active:
            _set(node, rules.SILU)
        elif t in _GELU and node in active:
            _set(node, rules.GELU)
        elif node in active and _activation_kind(node):
            _set(node, rules.ACTIVATION, **{meta.ACTIVATION: _activation_kind(node)})
        elif t in DROPOUTS and node in active:
            _set(node, rules.DROPOUT)
        elif t in _CE:
            _set(node, rules.CROSS_ENTROPY)
        elif t in _BCE:
            _set(node, rules.BCE_LOGITS)
    by_name = {n.name: n for n in gm.graph.nodes}
    solver = meta.graph_meta(gm)[meta.SOLVER]
    for node in gm.graph.nodes:
        if (node.target in _SELECT and node in active and meta.get(node, meta.RULE) is None
                and _picks_for_head(node, solver)):
            _set(node, rules.PICK)
    for node in gm.graph.nodes:  # parameters used as values (position tables, cls tokens)
        if node.op == "placeholder" and meta.get(node, meta.PARAM) and node.users:
            if node.meta["val"].dim() < 2 or any(
                    meta.get(u, meta.RULE) not in (None, rules.NORM_OP) for u in node.users):
                continue
            use = _direct_use(node, active)
            if use:
                meta.node_meta(node)[meta.DIRECT] = use
                if use["kind"] == "add":
                    _set(by_name[use["op"]], rules.ADD)
    for node in gm.graph.nodes:
        if node.op != "call_function" or meta.get(node, meta.RULE) is not None:
            continue
        if node.target in MATMULS and node.name not in attention_parts and node in active:
            _set(node, rules.MATMUL)
        elif node.target in MULS and len(node.args) == 2 and all(a in active for a in node.args):
            # up * act(gate): the gated unit takes over the activation's scaling.
            for _up, act in (node.args, node.args[::-1]):
                if meta.get(act, meta.RULE) in _GATE_ACTS and len(act.users) == 1:
                    _set(node, rules.GATED, **{meta.GATE: act.name})
                    meta.node_meta(act)[meta.RULE] = rules.GATE_ACT
                    break
    return PassResult(gm, False)
