"""Small graph helpers shared by the passes (one copy of each, here)."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import fx

from umup_fx import meta
from umup_fx.runtime.names import canonical_name

aten = torch.ops.aten


def ops(*names: str) -> set[Any]:
    """ATen overloads by "name.overload"; ones missing in this torch are skipped."""
    out = set()
    for name in names:
        packet, _, overload = name.partition(".")
        op = getattr(getattr(aten, packet, None), overload or "default", None)
        if op is not None:
            out.add(op)
    return out


# Ops that move or relabel values without changing their scale.
TRANSPARENT = ops(
    "_to_copy", "to.dtype", "to.dtype_layout", "clone", "alias", "detach", "contiguous",
    "view", "reshape", "_unsafe_view", "transpose.int", "permute", "t", "numpy_T", "unsqueeze",
    "squeeze.dim", "squeeze.dims", "expand", "type_as", "lift_fresh_copy",
)
TYPE_AS = ops("type_as")
MATMULS = ops("mm", "bmm", "matmul")
BADDBMM = ops("baddbmm")  # bias + alpha * (b1 @ b2): Bloom's ALiBi logits
ASSERTS = ops("_assert_tensor_metadata")  # export's checks: read no value
DROPOUTS = ops("dropout", "native_dropout", "feature_dropout")
SOFTMAXES = ops("softmax.int", "_softmax", "_safe_softmax")
ADDS = ops("add.Tensor", "add_.Tensor")  # in-place: see inplace_safe
INPLACE = ops("add_.Tensor", "mul_.Tensor")
MULS = ops("mul.Tensor")
DIVS = ops("div.Tensor")
# Grouped matmuls of MoE experts, x[S, in] @ W[E, in, out] per expert slice of x (offs):
# ATen's own and transformers' fallback custom op (registered when transformers loads
# its MoE integration, so matched by qualified name).
GROUPED_MMS = ("aten::_grouped_mm", "transformers::grouped_mm_fallback")


def is_grouped_mm(target: Any) -> bool:
    return isinstance(target, torch._ops.OpOverload) and target._schema.name in GROUPED_MMS


def inplace_safe(node: fx.Node) -> bool:
    """An in-place op may become its out-of-place twin when nothing reads the mutated
    tensor after it (the rewrite's ops return new tensors)."""
    if node.target not in INPLACE:
        return True
    target = node.args[0]
    later = False
    for n in node.graph.nodes:
        if n is node:
            later = True
        elif later and target in n.all_input_nodes:
            return False
    return True


def einsum_letters(equation: str) -> tuple[list[str], str] | None:
    """(operand subscripts, output subscripts) of an explicit einsum equation without
    ``...``; None for the forms the passes do not read (implicit output, ellipsis)."""
    eq = equation.replace(" ", "")
    if "->" not in eq or "." in eq:
        return None
    inputs, out = eq.split("->")
    return inputs.split(","), out


def is_tensor(node: Any) -> bool:
    return isinstance(node, fx.Node) and isinstance(node.meta.get("val"), torch.Tensor)


def param_name(node: Any) -> str | None:
    """The canonical parameter name if ``node`` is a parameter placeholder."""
    if isinstance(node, fx.Node) and node.op == "placeholder":
        return meta.get(node, meta.PARAM)
    return None


def source(node: Any) -> Any:
    """Walk back through transparent ops to the value's producer."""
    while (
        isinstance(node, fx.Node)
        and node.op == "call_function"
        and node.target in TRANSPARENT
        and node.args
    ):
        node = node.args[0]
    return node


SPLITS = ops("split.Tensor", "split_with_sizes", "chunk", "unbind.int")


def split_part_of(node: Any) -> Any:
    """The value ``node`` is one part of (``getitem(split(x), i)``), else ``node``."""
    if (isinstance(node, fx.Node) and getattr(node.target, "__name__", "") == "getitem"
            and isinstance(node.args[0], fx.Node) and node.args[0].target in SPLITS):
        return source(node.args[0].args[0])
    return node


def param_of(node: Any) -> str | None:
    """The parameter a value is (through transparent ops), if any; one part of a split
    parameter counts as it (nn.MultiheadAttention's in_proj_weight for cross-attention),
    and a weight norm's result as its direction ``v`` (``passes/weight_norm.py``)."""
    node = split_part_of(source(node))
    if isinstance(node, fx.Node) and meta.get(node, meta.WEIGHT_NORM):
        node = source(node.args[0])
    return param_name(node)


def value_inputs(node: fx.Node) -> list[fx.Node]:
    """The inputs whose values ``node``'s value is computed from: ``a.type_as(b)`` reads
    only ``b``'s dtype (Meta's llama: ``mask.type_as(h)`` is no activation)."""
    if node.target in TYPE_AS:
        return [node.args[0]] if isinstance(node.args[0], fx.Node) else []
    return node.all_input_nodes


def consumers(node: fx.Node) -> list[fx.Node]:
    """The ops that read ``node``'s value, in graph order, looking through transparent
    ops (export's ``_assert_tensor_metadata`` checks read nothing)."""
    out: list[fx.Node] = []
    for u in node.users:
        if u.target in TYPE_AS and u.args[0] is not node:
            continue  # reads the dtype only
        if u.target in TRANSPARENT:
            out.extend(consumers(u))
        elif u.target not in ASSERTS:
            out.append(u)
    return out


def param_dependent(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose value depends on some parameter: the activations."""
    out: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if param_name(node) is not None or any(a in out for a in value_inputs(node)):
            out.add(node)
    return out


def module_path(node: fx.Node, default: str = "") -> str:
    """The canonical path of the innermost module whose forward ran ``node``
    (``default`` when the capture recorded none)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return default
    return canonical_name(list(stack.values())[-1][0].split("@")[0])


def where(node: fx.Node) -> str:
    """The user source line that produced a node, for messages."""
    trace = node.meta.get("stack_trace")
    if not trace:
        return f"graph node {node.name}"
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip()]
    frames = [(ln, lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith("File ")
               else "") for i, ln in enumerate(lines) if ln.startswith("File ")]
    # The innermost frame outside torch itself: the model's line that called nn.Linear.
    own = [f for f in frames if _TORCH_DIR not in f[0]] or frames
    loc, code = own[-1] if own else ("", "")
    return f"{loc} {code}".strip() or f"graph node {node.name}"


_TORCH_DIR = os.path.join(os.path.dirname(torch.__file__), "")


def op_name(node: fx.Node) -> str:
    target = node.target
    name = getattr(target, "__name__", None) or str(target)
    return str(target) if isinstance(target, torch._ops.OpOverload) else name
