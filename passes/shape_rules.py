"""Per-op shape rules for the dims pass: how each ATen op ties the axes of its inputs
and output (``linear``: x[-1] = W[1]; reshapes: products of dims). One function per op
family, and the table ``RULES`` / ``MULTI_RULES`` from op overload to rule, read top
to bottom. A rule gets the running propagator ``p`` (``passes.dims``) and the node.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import sympy as sp
import torch
from torch import fx

from umup_fx import meta

from ._graph import einsum_letters, ops, source
from .dim_solver import (
    FIXED,
    NEUTRAL,
    Dims,
    arg_or,
    fake_value,
    is_tensor,
    norm_axis,
    shape_of,
    size_hint,
)

if TYPE_CHECKING:
    from .dims import Propagator

aten = torch.ops.aten

# -- shape rules, one per op family -------------------------------------------------
Rule = Callable[..., Any]  # (p: dims.Propagator, node) -> Dims
_CONVOLUTION = ops("convolution")


def _linear(p: Propagator, n: fx.Node) -> Dims:
    x, w = n.args[0], n.args[1]
    b = arg_or(n, 2, "bias")
    xd, wd = p.d(x), p.d(w)
    p.s.equate(xd[-1], wd[1], n.name)
    p.contracted.append(wd[1])
    if isinstance(b, fx.Node):
        p.s.equate(p.d(b)[-1], wd[0], n.name)
    return xd[:-1] + (wd[0],)


def _matmul_dims(p: Propagator, n: fx.Node, a: fx.Node, b: fx.Node) -> Dims:
    ad, bd = p.d(a), p.d(b)
    a2 = ad if len(ad) > 1 else (sp.Integer(1),) + ad
    b2 = bd if len(bd) > 1 else bd + (sp.Integer(1),)
    p.s.equate(a2[-1], b2[-2], n.name)
    batch_a, batch_b = a2[:-2], b2[:-2]
    shape = shape_of(n)
    nbatch = len(shape) - (len(ad) > 1) - (len(bd) > 1)
    batch: list[sp.Expr] = []
    for k in range(nbatch, 0, -1):
        cand = [bt[-k] for bt in (batch_a, batch_b) if len(bt) >= k and bt[-k] != 1]
        for c in cand[1:]:
            p.s.equate(cand[0], c, n.name)
        batch.append(cand[0] if cand else sp.Integer(1))
    out = tuple(batch)
    if len(ad) > 1:
        out += (a2[-2],)
    if len(bd) > 1:
        out += (b2[-1],)
    return out


def _contract_weight(p: Propagator, w: Any) -> None:
    if meta.get(source(w), meta.KIND) == "param":
        p.contracted.append(p.d(w)[-2])


def _mm(p: Propagator, n: fx.Node) -> Dims:
    _contract_weight(p, n.args[1])
    return _matmul_dims(p, n, n.args[0], n.args[1])


def _addmm(p: Propagator, n: fx.Node) -> Dims:
    _contract_weight(p, n.args[2])
    out = _matmul_dims(p, n, n.args[1], n.args[2])
    bias = n.args[0]
    if is_tensor(bias):
        bd = p.d(bias)
        for k in range(1, len(bd) + 1):
            if bd[-k] != 1:
                p.s.equate(bd[-k], out[-k], n.name)
    return out


def grouped_mm_rule(p: Propagator, n: fx.Node) -> Dims:
    """x[S, in] @ W[E, in, out] by expert slices of x: [S, out]. E counts experts (fixed);
    a 3-D x[E, S, in] (no offsets) is one batch of S rows per expert."""
    xd, wd = p.d(n.args[0]), p.d(n.args[1])
    p.s.equate(xd[-1], wd[-2], n.name)
    p.s.mark_fixed(wd[0], "experts")
    _contract_weight(p, n.args[1])
    if len(xd) == 3:
        p.s.equate(xd[0], wd[0], n.name)
    return xd[:-1] + (wd[-1],)


def _baddbmm(p: Propagator, n: fx.Node) -> Dims:
    """beta * bias + alpha * (b1 @ b2): the matmul's dims; the bias broadcasts to them."""
    out = _matmul_dims(p, n, n.args[1], n.args[2])
    bias = n.args[0]
    if is_tensor(bias):
        bd = p.d(bias)
        for k in range(1, min(len(bd), len(out)) + 1):
            if bd[-k] != 1:
                p.s.equate(bd[-k], out[-k], n.name)
    return out


def table_rows(table: fx.Node, idx: fx.Node) -> str:
    """The name of a lookup table's rows, from where its indices come from: a model
    input (token ids: ``vocab``), ``arange`` (a position table: ``positions``), or
    neither (a buffer: the table's own name, e.g. ``token_type_embeddings_rows``)."""
    seen, todo, from_input = set(), [idx], False
    while todo and len(seen) < 200:
        node = todo.pop()
        if not isinstance(node, fx.Node) or node in seen or not is_tensor(node):
            continue  # SymInt sizes (arange(seq)) do not carry token ids
        seen.add(node)
        if node.op == "call_function" and node.target in (aten.arange.default, aten.arange.start,
                                                          aten.arange.start_step):
            return "positions"
        from_input |= node.op == "placeholder" and meta.get(node, meta.KIND, "input") == "input"
        todo.extend(node.all_input_nodes)
    if from_input:
        return "vocab"
    name = meta.get(source(table), meta.PARAM) or "table"
    parts = [q for q in name.split(".") if q not in ("weight",) and not q.isdigit()]
    return f"{parts[-1] if parts else 'table'}_rows"


def _embedding(p: Propagator, n: fx.Node) -> Dims:
    w, idx = n.args[0], n.args[1]
    wd = p.d(w)
    p.s.mark_fixed(wd[0], table_rows(w, idx))
    return p.d(idx) + (wd[1],)


def _reshape(p: Propagator, n: fx.Node) -> Dims:
    """Group input and output axes by equal products of sizes, then tie each group."""
    src, dst = p.d(n.args[0]), shape_of(n)
    src_sizes = shape_of(n.args[0])
    out: list[sp.Expr] = []
    i = j = 0
    while i < len(src) or j < len(dst):
        gi, gj = [], []
        pi = pj = 1
        # Size-1 axes stand alone.
        if i < len(src) and src_sizes[i] == 1 and (j >= len(dst) or dst[j] != 1):
            i += 1
            continue
        if j < len(dst) and dst[j] == 1 and (i >= len(src) or src_sizes[i] != 1):
            out.append(sp.Integer(1))
            j += 1
            continue
        while True:
            if pi <= pj and i < len(src):
                gi.append(i)
                pi *= src_sizes[i]
                i += 1
            elif j < len(dst):
                gj.append(j)
                pj *= dst[j]
                j += 1
            else:
                break
            if pi == pj and gi and gj:
                break
        total = sp.Mul(*[src[k] for k in gi]) if gi else sp.Integer(1)
        if len(gj) == 1:
            out.append(total)
            continue
        lead = [p.s.new(NEUTRAL, dst[k], f"{n.name}[{k}]") for k in gj[:-1]]
        out.extend(lead)
        out.append(total / sp.Mul(*lead))
    return tuple(out)


def _expand(p: Propagator, n: fx.Node) -> Dims:
    src, ssz, dst = p.d(n.args[0]), shape_of(n.args[0]), shape_of(n)
    out: list[sp.Expr] = []
    offset = len(dst) - len(src)
    for k, size in enumerate(dst):
        j = k - offset
        if j >= 0 and ssz[j] == size:
            out.append(src[j])
        else:
            out.append(p.s.new(NEUTRAL, size, f"{n.name}[{k}]"))
    return tuple(out)


def _transpose(p: Propagator, n: fx.Node) -> Dims:
    d = list(p.d(n.args[0]))
    if len(d) < 2:
        return tuple(d)
    a = norm_axis(n.args[1], len(d)) if len(n.args) > 1 else 0
    b = norm_axis(n.args[2], len(d)) if len(n.args) > 2 else 1
    d[a], d[b] = d[b], d[a]
    return tuple(d)


def _permute(p: Propagator, n: fx.Node) -> Dims:
    d = p.d(n.args[0])
    return tuple(d[norm_axis(k, len(d))] for k in n.args[1])


def _unsqueeze(p: Propagator, n: fx.Node) -> Dims:
    d = list(p.d(n.args[0]))
    d.insert(norm_axis(n.args[1], len(d) + 1), sp.Integer(1))
    return tuple(d)


def _squeeze(p: Propagator, n: fx.Node) -> Dims:
    d, sizes = p.d(n.args[0]), shape_of(n.args[0])
    if len(n.args) > 1:
        axes = n.args[1] if isinstance(n.args[1], (list, tuple)) else [n.args[1]]
        axes = {norm_axis(a, len(d)) for a in axes}
    else:
        axes = set(range(len(d)))
    return tuple(e for k, e in enumerate(d) if not (k in axes and sizes[k] == 1))


def _part(p: Propagator, n: fx.Node, whole: sp.Expr, total: int, part: int) -> sp.Expr:
    if part == total:
        return whole
    return whole * sp.Rational(part, total)


def _slice(p: Propagator, n: fx.Node) -> Dims:
    d = list(p.d(n.args[0]))
    axis = norm_axis(arg_or(n, 1, "dim", 0), len(d))
    total, part = shape_of(n.args[0])[axis], shape_of(n)[axis]
    d[axis] = _part(p, n, d[axis], total, part)
    return tuple(d)


def _select(p: Propagator, n: fx.Node) -> Dims:
    d = list(p.d(n.args[0]))
    del d[norm_axis(n.args[1], len(d))]
    return tuple(d)


def _reduce(p: Propagator, n: fx.Node) -> Dims:
    d = p.d(n.args[0])
    axes = arg_or(n, 1, "dim")
    val = n.meta.get("val")
    # keepdim sits at a different index per overload (var.dim's is 3): read the rank
    keep = val.dim() == len(d) if val is not None else bool(arg_or(n, 2, "keepdim", False))
    if axes is None:
        return ()
    axes = {norm_axis(a, len(d)) for a in (axes if isinstance(axes, (list, tuple)) else [axes])}
    if keep:
        return tuple(sp.Integer(1) if k in axes else e for k, e in enumerate(d))
    return tuple(e for k, e in enumerate(d) if k not in axes)


def _full_reduce(p: Propagator, n: fx.Node) -> Dims:
    return ()


def _cat(p: Propagator, n: fx.Node) -> Dims:
    tensors = [t for t in n.args[0] if is_tensor(t) and shape_of(t) != [0]]
    axis = norm_axis(arg_or(n, 1, "dim", 0), len(shape_of(n)))
    first = list(p.d(tensors[0]))
    for t in tensors[1:]:
        for k, e in enumerate(p.d(t)):
            if k != axis:
                p.s.equate(first[k], e, n.name)
    first[axis] = sp.Add(*[p.d(t)[axis] for t in tensors])
    return tuple(first)


def _stack(p: Propagator, n: fx.Node) -> Dims:
    tensors = list(n.args[0])
    first = list(p.d(tensors[0]))
    for t in tensors[1:]:
        for a, b in zip(first, p.d(t), strict=False):
            p.s.equate(a, b, n.name)
    first.insert(norm_axis(arg_or(n, 1, "dim", 0), len(first) + 1), sp.Integer(len(tensors)))
    return tuple(first)


def _sdpa(p: Propagator, n: fx.Node) -> Dims:
    q, k, v = (p.d(a) for a in n.args[:3])
    p.s.equate(q[-1], k[-1], n.name)
    p.s.equate(k[-2], v[-2], n.name)
    qs, vs = shape_of(n.args[0]), shape_of(n.args[2])
    for i in range(len(q) - 2):  # batch / head axes (GQA: kv heads may differ)
        if qs[i] == vs[i]:
            p.s.equate(q[i], v[i], n.name)
    return q[:-1] + (v[-1],)


def _norm_affine(p: Propagator, n: fx.Node, affine: tuple[Any, ...]) -> Dims:
    """A norm's output is its input; its gain / bias match the trailing axes."""
    x = p.d(n.args[0])
    for t in affine:
        if is_tensor(t):
            td = p.d(t)
            for k in range(1, len(td) + 1):
                p.s.equate(td[-k], x[-k], n.name)
    return x


def _layer_norm(p: Propagator, n: fx.Node) -> Dims:
    return _norm_affine(p, n, (arg_or(n, 2, "weight"), arg_or(n, 3, "bias")))


def _rms_norm(p: Propagator, n: fx.Node) -> Dims:
    return _norm_affine(p, n, (arg_or(n, 2, "weight"),))


def _cross_entropy(p: Propagator, n: fx.Node) -> Dims:
    logits, target = p.d(n.args[0]), p.d(n.args[1])
    # "out", as a model's output dim: the same logits axis whether or not the loss is
    # in the captured graph (analyze without targets, transform with them).
    p.s.mark_fixed(logits[1 if len(logits) > 1 else 0], "out")
    reduction = arg_or(n, 3, "reduction", 1)
    return target if reduction == 0 else ()


def _spatial(p: Propagator, n: fx.Node, x: Dims, first: int) -> Dims:
    """Spatial output axes from ``first`` on: the input's dim when the size is kept, else a
    new fixed dim (kernel, stride and padding are data-side numbers, never widths)."""
    xs, shape = shape_of(n.args[0]), shape_of(n)
    out = []
    for k in range(first, len(shape)):
        same = k < len(xs) and xs[k] == shape[k]
        out.append(x[k] if same else p.s.new(FIXED, shape[k], f"{n.name}[{k}]", "spatial"))
    return tuple(out)


def _conv(p: Propagator, n: fx.Node) -> Dims:
    """conv{1,2,3}d / convolution: x[C_in] = W[1] * groups, out[C] = W[0], kernels fixed.

    A depthwise conv (groups = C_in, W[1] = 1) has one group per channel: the group count
    is the width, so W[0] = multiplier * C_in ties out to in and W[1] is a fixed 1
    (rules.md "Grouped and depthwise convolutions"); other group counts are fixed numbers.
    """
    x, w = p.d(n.args[0]), p.d(n.args[1])
    kernel = len(w) - 2
    channel = len(x) - kernel - 1  # 1 batched, 0 unbatched
    groups = arg_or(n, 8 if n.target in _CONVOLUTION else 6, "groups", 1)
    c_in, (c_out, per_group) = shape_of(n.args[0])[channel], shape_of(n.args[1])[:2]
    if groups > 1 and per_group == 1 and groups == c_in:
        p.s.mark_fixed(w[1], "group")
        p.s.equate(w[0], x[channel] * (c_out // c_in), n.name)
    else:
        p.s.equate(x[channel], w[1] * groups, n.name)
    for e in w[2:]:
        p.s.mark_fixed(e, "kernel")
    bias = arg_or(n, 2, "bias")
    if isinstance(bias, fx.Node):
        p.s.equate(p.d(bias)[0], w[0], n.name)
    return x[:channel] + (w[0],) + _spatial(p, n, x, channel + 1)


def _pool(p: Propagator, n: fx.Node) -> Dims:
    """Pooling keeps batch and channel axes; spatial axes as ``_spatial``."""
    x = p.d(n.args[0])
    ndim = len(shape_of(n))
    first = ndim - int(n.target._opname[-2])  # avg_pool2d: 2 spatial axes
    return x[:first] + _spatial(p, n, x, first)


def _batch_norm(p: Propagator, n: fx.Node) -> Dims:
    """batch_norm / group_norm: affine parameters (and statistics) per channel (axis 1)."""
    x = p.d(n.args[0])
    for t in n.args[1:5]:
        if is_tensor(t):
            p.s.equate(p.d(t)[0], x[1], n.name)
    return x


def _index(p: Propagator, n: fx.Node) -> Dims:
    """x[..., idx, ...] with one index tensor: its axis becomes the index's axes; a
    parameter indexed on its rows by integers is a table (rows fixed, as embedding)."""
    x, indices = p.d(n.args[0]), list(n.args[1])
    tensors = [k for k, t in enumerate(indices) if t is not None]
    if len(tensors) != 1 or not is_tensor(indices[tensors[0]]):
        return p.fresh(n)
    k, idx = tensors[0], indices[tensors[0]]
    if k == 0 and meta.get(source(n.args[0]), meta.KIND) == "param" and not fake_value(idx).is_floating_point():
        p.s.mark_fixed(x[0], table_rows(n.args[0], idx))
    return x[:k] + p.d(idx) + x[k + 1:]


def _einsum(p: Propagator, n: fx.Node) -> Dims:
    """Subscripts name dims: each letter is one dim across operands and output."""
    parsed = einsum_letters(n.args[0])
    operands = list(n.args[1])
    if parsed is None or len(parsed[0]) != len(operands):
        return p.fresh(n)
    letters: dict[str, sp.Expr] = {}
    for subs, t in zip(parsed[0], operands, strict=True):
        for letter, e in zip(subs, p.d(t), strict=True):
            if letter in letters:
                p.s.equate(letters[letter], e, n.name)
            else:
                letters[letter] = e
    return tuple(letters[letter] for letter in parsed[1])


def _index_add(p: Propagator, n: fx.Node) -> Dims:
    """self.index_add(dim, index, source): self's dims; source's other axes match them."""
    d, src = p.d(n.args[0]), p.d(n.args[3])
    axis = norm_axis(n.args[1], len(d))
    for i, (a, b) in enumerate(zip(d, src, strict=True)):
        if i != axis:
            p.s.equate(a, b, n.name)
    return d


def _one_hot(p: Propagator, n: fx.Node) -> Dims:
    """One-hot codes of integers: the classes axis is a fixed count (a router's experts)."""
    classes = p.s.new(FIXED, size_hint(fake_value(n).shape[-1]), f"{n.name}.classes")
    return p.d(n.args[0]) + (classes,)


def _factory(p: Propagator, n: fx.Node) -> Dims:
    return p.fresh(n)


def _split(p: Propagator, n: fx.Node) -> list[Dims]:
    d = p.d(n.args[0])
    axis = norm_axis(arg_or(n, 2, "dim", 0), len(d))
    total = shape_of(n.args[0])[axis]
    out = []
    for v in fake_value(n):
        dims = list(d)
        dims[axis] = _part(p, n, d[axis], total, size_hint(v.shape[axis]))
        out.append(tuple(dims))
    return out


def _unbind(p: Propagator, n: fx.Node) -> list[Dims]:
    d = list(p.d(n.args[0]))
    del d[norm_axis(arg_or(n, 1, "dim", 0), len(d))]
    return [tuple(d) for _ in fake_value(n)]


def _topk(p: Propagator, n: fx.Node) -> list[Dims]:
    """values and indices of the k largest along an axis: that axis is a set of choices
    (a router's experts), a fixed count, never a width; k is a new fixed dim."""
    d = list(p.d(n.args[0]))
    axis = norm_axis(arg_or(n, 2, "dim", -1), len(d))
    p.s.mark_fixed(d[axis], "experts")
    d[axis] = p.s.new(FIXED, size_hint(fake_value(n)[0].shape[axis]), f"{n.name}.k")
    return [tuple(d), tuple(d)]


def _native_layer_norm(p: Propagator, n: fx.Node) -> list[Dims]:
    x = _layer_norm(p, n)
    stats = tuple(x[: len(x) - len(n.args[1])]) + (sp.Integer(1),) * len(n.args[1])
    return [x, stats, stats]


def _native_dropout(p: Propagator, n: fx.Node) -> list[Dims]:
    x = p.d(n.args[0])
    return [x, x]


def _getitem(p: Propagator, n: fx.Node) -> Dims:
    return p.d(n.args[0])[n.args[1]]


def _same(p: Propagator, n: fx.Node) -> Dims:
    return p.d(n.args[0])


def _weight_norm(p: Propagator, n: fx.Node) -> Dims:
    """``_weight_norm(v, g, dim)``: the result is ``v``'s shape; ``g`` keeps ``v``'s axis
    ``dim`` (size 1 elsewhere)."""
    vd, gd = p.d(n.args[0]), p.d(n.args[1])
    if len(gd) == len(vd):
        for a, b, size in zip(vd, gd, shape_of(n.args[1]), strict=True):
            if size != 1:
                p.s.equate(a, b, n.name)
    return vd


def _table(entries: list[tuple[set[Any] | list[Any], Any]]) -> dict[Any, Any]:
    """{op overload: rule} from (overloads, rule) rows."""
    return {target: rule for targets, rule in entries for target in targets}


RULES: dict[Any, Rule] = _table([
    (ops("linear"), _linear),
    (ops("mm", "bmm", "matmul"), _mm),
    (ops("addmm"), _addmm),
    (ops("baddbmm"), _baddbmm),
    (ops("embedding"), _embedding),
    (ops("view", "reshape", "_unsafe_view", "view_copy", "flatten.using_ints", "unflatten.int"), _reshape),
    (ops("expand", "expand_copy"), _expand),
    (ops("transpose.int", "t", "numpy_T"), _transpose),
    (ops("permute"), _permute),
    (ops("unsqueeze"), _unsqueeze),
    (ops("squeeze", "squeeze.dim", "squeeze.dims"), _squeeze),
    (ops("slice.Tensor", "narrow"), _slice),
    (ops("select.int"), _select),
    (
        ops(
            "mean.dim", "sum.dim_IntList", "amax", "amin", "var.correction", "std.correction",
            "var.dim", "std.dim", "logsumexp", "norm.ScalarOpt_dim", "linalg_vector_norm",
        ),
        _reduce,
    ),
    (ops("mean", "sum", "max", "min"), _full_reduce),
    (ops("cat"), _cat),
    (ops("stack"), _stack),
    (ops("scaled_dot_product_attention"), _sdpa),
    (ops("layer_norm"), _layer_norm),
    (ops("batch_norm", "group_norm"), _batch_norm),
    (ops("conv1d", "conv2d", "conv3d", "conv1d.padding", "conv2d.padding", "conv3d.padding",
         "convolution"), _conv),
    (ops("avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
         "adaptive_avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d"), _pool),
    (ops("index.Tensor"), _index),
    (ops("einsum"), _einsum),
    (ops("index_add", "index_add_"), _index_add),
    (ops("one_hot"), _one_hot),
    (ops("rms_norm"), _rms_norm),
    (ops("cross_entropy_loss", "nll_loss", "nll_loss_nd"), _cross_entropy),
    (
        ops(
            "arange", "arange.start", "arange.start_step", "zeros", "ones", "full", "empty.memory_format",
            "rand", "randn", "scalar_tensor", "tensor", "ones_like", "zeros_like", "full_like",
            "empty_like",
        ),
        _factory,
    ),
    ([operator.getitem], _getitem),
    (ops("clone", "alias", "detach", "contiguous", "_to_copy", "to.dtype", "lift_fresh_copy"), _same),
    (ops("_weight_norm"), _weight_norm),
])

MULTI_RULES: dict[Any, Callable[..., list[Dims]]] = _table([
    (ops("split.Tensor", "split_with_sizes", "chunk", "tensor_split.sections"), _split),
    (ops("unbind.int"), _unbind),
    (ops("native_layer_norm"), _native_layer_norm),
    (ops("native_dropout"), _native_dropout),
    (ops("topk"), _topk),
])

