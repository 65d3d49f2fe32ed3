"""The reference call: the sizes every scale of a transformed model is fixed at.

A rewritten graph takes its reference sizes (rows a weight sees, the attention's key
length, the loss's rows: rules §3, "Reference sizes") from the example inputs it was
captured with. A call structure first seen after ``transform`` (no labels, another
keyword) is captured then, on that call; its graph must use the transform's reference
sizes, or its scales (the readout's backward, an embedding's gradient) would follow
whatever batch came first. Capture runs on ``meta`` stand-ins, so the call's tensors
are replaced by ``meta`` tensors of the reference sizes: each argument that the
transform's call also had takes that argument's shape; others map each size the
shared arguments tie (batch, sequence) to its reference value.

The ``"umup"`` backend does the same for Dynamo's graphs (``dynamo_inputs_at_reference``):
their inputs are named by where Dynamo took them from, and since the weights are real
there, the stand-ins are zeros on the inputs' device, with the sizes that changed
exported symbolic so that the graph still takes the call's sizes.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.export import Dim


def _bound(forward: Callable[..., Any], args: tuple, kwargs: dict) -> dict[str, Any]:
    """Arguments by parameter name (``**kwargs`` entries by their own names)."""
    try:
        params = inspect.signature(forward).parameters
        bound = inspect.signature(forward).bind_partial(*args, **kwargs).arguments
    except (TypeError, ValueError):
        return {**{f"#{i}": a for i, a in enumerate(args)}, **kwargs}
    out: dict[str, Any] = {}
    for name, value in bound.items():
        kind = params[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            out.update({f"{name}#{i}": v for i, v in enumerate(value)})
        else:
            out[name] = value
    return out


def _size_map(named: dict[str, Any], reference: dict[str, tuple]) -> dict[int, int] | None:
    """Each size of the tensors ``named`` shares with the reference call -> its reference
    size; None when nothing is shared or one size stands for two reference sizes."""
    sizes: dict[int, int] = {}
    for name, value in named.items():
        ref = reference.get(name)
        if not isinstance(value, torch.Tensor) or ref is None or len(ref) != value.dim():
            continue
        for now, then in zip(value.shape, ref, strict=True):
            if sizes.setdefault(now, then) != then:
                return None  # no safe map
    return sizes or None


def reference_shapes(forward: Callable[..., Any], args: tuple, kwargs: dict) -> dict[str, tuple]:
    """Each tensor argument's shape in the transform's call, by name."""
    return {k: tuple(v.shape) for k, v in _bound(forward, args, kwargs).items()
            if isinstance(v, torch.Tensor)}


def at_reference_sizes(
    forward: Callable[..., Any], reference: dict[str, tuple], args: tuple, kwargs: dict
) -> tuple[tuple, dict] | None:
    """``(args, kwargs)`` with every tensor a ``meta`` tensor at the reference sizes, or
    None when no argument is shared with the reference call or the sizes conflict."""
    bound = _bound(forward, args, kwargs)
    sizes = _size_map(bound, reference)
    if sizes is None:
        return None
    shaped = {id(v): reference[k] for k, v in bound.items()
              if isinstance(v, torch.Tensor) and k in reference and len(reference[k]) == v.dim()}

    def resize(v: Any) -> Any:
        if not isinstance(v, torch.Tensor):
            return v
        shape = shaped.get(id(v)) or tuple(sizes.get(n, n) for n in v.shape)
        return torch.empty(shape, dtype=v.dtype, device="meta")

    return pytree.tree_map(resize, (tuple(args), dict(kwargs)))


def dynamo_input_name(source: str | None, forward: Callable[..., Any]) -> str | None:
    """The name ``reference_shapes`` gives the argument of ``forward`` that a Dynamo graph
    input is (``L['idx']`` -> ``idx``; a keyword through ``**kwargs``, also a decorator's,
    ``L['kwargs']['labels']`` -> ``labels``; an element of ``forward``'s ``*args`` ->
    ``args#0``); None for anything else (weights, sizes, nested values)."""
    found = re.fullmatch(r"L\['(\w+)'\](?:\['([^']*)'\]|\[(\d+)\])?", source or "")
    if found is None:
        return None
    name, key, index = found.groups()
    try:
        kind = inspect.signature(forward).parameters[name].kind
    except (KeyError, TypeError, ValueError):
        kind = None  # a wrapper's own (*args, **kwargs)
    if key is None and index is None:
        return name if kind is not None else None
    if key is not None and kind in (None, inspect.Parameter.VAR_KEYWORD):
        return key
    if index is not None and kind is inspect.Parameter.VAR_POSITIONAL:
        return f"{name}#{index}"
    return None


def dynamo_inputs_at_reference(
    inputs: list[Any], sources: list[str | None], model: torch.nn.Module,
    reference: dict[str, tuple],
) -> tuple[list[Any], tuple | None] | None:
    """A Dynamo graph's inputs at the reference sizes, for the ``"umup"`` backend.

    Every tensor that is not ``model``'s own (a weight or buffer) takes its reference
    shape (zeros on its device: the capture reads shapes only), every size
    input (``L['idx'].size()[1]``) its tensor's new size. Returns those inputs and the
    dynamic shapes (``Dim.AUTO`` on each size that changed) an export needs for its graph
    to take the original inputs too (None: they already are the reference's); None
    when no input is shared with the reference or the sizes conflict.
    """
    forward = model.forward
    named = {dynamo_input_name(s, forward): x for s, x in zip(sources, inputs, strict=True)}
    sizes = _size_map({k: v for k, v in named.items() if k is not None}, reference)
    if sizes is None:
        return None
    own = {id(t) for t in (*model.parameters(), *model.buffers())}
    resized: list[Any] = []
    dynamic: list[Any] = []
    for source, x in zip(sources, inputs, strict=True):
        if isinstance(x, torch.Tensor) and id(x) not in own:
            ref = reference.get(dynamo_input_name(source, forward) or "")
            shape = ref if ref is not None and len(ref) == x.dim() else [sizes.get(n, n) for n in x.shape]
            resized.append(torch.zeros(shape, dtype=x.dtype, device=x.device))
            changed = {i: Dim.AUTO for i, (a, b) in enumerate(zip(x.shape, shape, strict=True)) if a != b}
            dynamic.append(changed or None)
        else:
            resized.append(x)
            dynamic.append(None)
    for i, source in enumerate(sources):  # sizes after the tensors they are read from
        size_of = re.fullmatch(r"(.*)\.size\(\)\[(\d+)\]", source or "")
        if size_of is not None and isinstance(inputs[i], int) and size_of[1] in sources:
            tensor = resized[sources.index(size_of[1])]
            resized[i] = int(tensor.shape[int(size_of[2])])
            dynamic[i] = Dim.AUTO if resized[i] != inputs[i] else None
    if all(d is None for d in dynamic):
        return inputs, None
    return resized, tuple(dynamic)
