"""Errors raised inside a rewritten graph, reported in the user's terms.

A rewritten graph is generated code (``<eval_with_key>``) calling umup_fx's ops, so a
raw exception from it points at neither the user's model nor the op they wrote. When
a region's graph raises, the module is first run as written (its own classes, every
block's too, no grad: ``runtime.modules.own_error``) on the same call: if that raises
too, the call itself is wrong and the user gets their model's own error. Otherwise the
failing graph node is found from the traceback (``GraphModule._lineno_map``) and a ``GraphRunError`` names
the user's source line (the node's ``stack_trace``) and the op they wrote.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from umup_fx.errors import CallError, GraphRunError, UmupError

_REPORTED = "_umup_reported"  # set on an exception already in the user's terms


def failing_node(gm: fx.GraphModule, exc: BaseException) -> fx.Node | None:
    """The node of ``gm`` whose generated line the innermost frame of ``gm`` ran."""
    code = getattr(gm.forward, "__code__", None)
    found, tb = None, exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code is code:
            found = tb.tb_lineno
        tb = tb.tb_next
    lines = getattr(gm, "_lineno_map", None)
    if found is None or not lines:
        return None
    index = lines.get(found - getattr(gm, "_prologue_start", 0))
    nodes = list(gm.graph.nodes)
    return nodes[index] if index is not None and 0 <= index < len(nodes) else None


def _user_line(node: fx.Node) -> str:
    """The last ``File ..., line N`` of the node's stack trace and its code line."""
    trace = (node.meta.get("stack_trace") or "").strip().splitlines()
    for i in range(len(trace) - 1, -1, -1):
        if trace[i].strip().startswith("File "):
            code = trace[i + 1].strip() if i + 1 < len(trace) else ""
            return trace[i].strip() + (f": {code}" if code else "")
    return "an unknown source line"


def _written_op(node: fx.Node) -> str:
    """The op the user wrote: export's ``torch_fn`` record, else the ATen op."""
    torch_fn = node.meta.get("torch_fn")
    if torch_fn:
        return str(torch_fn[1])
    aten = node.meta.get("original_aten")
    return str(aten) if aten is not None else str(getattr(node.target, "__name__", node.target))


def mark_reported(exc: BaseException) -> BaseException:
    """Mark ``exc`` as already in the user's terms (passed on as it is)."""
    setattr(exc, _REPORTED, True)
    return exc


def explain_graph_error(
    module: nn.Module, gm: fx.GraphModule, exc: Exception, own: BaseException | None
) -> BaseException:
    """The exception to raise for ``exc``, raised by ``gm`` running a call of ``module``:
    ``own``, the model's own error for this call (``runtime.modules.own_error``: the
    module as written run on it), or a ``GraphRunError``."""
    if isinstance(exc, UmupError) or getattr(exc, _REPORTED, False):
        return exc
    if own is not None:
        return own
    written = type(module).__bases__[-1]  # runtime.modules._subclass: (mixin, the class)
    node = failing_node(gm, exc)
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    if node is None:
        where = "an op of its rewritten graph"
    else:
        target = getattr(node.target, "__name__", str(node.target))
        where = (f"{_user_line(node)} (the {_written_op(node)} there, node {node.name}, "
                 f"now umup_fx's {target})")
    error = GraphRunError(
        f"The u-muP {written.__name__} failed at {where} with {type(exc).__name__}: {first}. "
        f"{written.__name__} as written runs this call without error, so this is umup_fx's "
        "rewrite: please report it with the model (the chained exception has the graph's "
        "traceback)."
    )
    return mark_reported(error)


def expect_sizes(x: torch.Tensor, sizes: tuple[int | None, ...], model: str, name: str) -> None:
    """Refuse an input whose shape is not ``sizes`` where those are numbers: the capture
    fixed those axes at the example's (its ``StaticSizeWarning``), and another size would
    fail deep inside the graph, or run the blocks at sizes baked in for the example's."""
    if x.dim() == len(sizes) and all(s is None or s == n for s, n in zip(sizes, x.shape, strict=True)):
        return
    want = ", ".join("*" if s is None else str(s) for s in sizes)
    raise CallError(
        f"{model} was transformed for {name} of shape [{want}] (the capture fixed those "
        f"sizes at the example's: its StaticSizeWarning said why); got {list(x.shape)}. Call "
        "it at that shape, or transform a fresh model with example inputs of the shape you "
        "need (a batch >= 2 and a sequence shorter than the model's maximum stay free)."
    )
