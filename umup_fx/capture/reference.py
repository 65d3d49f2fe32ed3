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
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree


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
    sizes: dict[int, int] = {}
    for name, value in bound.items():
        ref = reference.get(name)
        if not isinstance(value, torch.Tensor) or ref is None or len(ref) != value.dim():
            continue
        for now, then in zip(value.shape, ref, strict=True):
            if sizes.setdefault(now, then) != then:
                return None  # one size stands for two reference sizes: no safe map
    if not sizes:
        return None
    shaped = {id(v): reference[k] for k, v in bound.items()
              if isinstance(v, torch.Tensor) and k in reference and len(reference[k]) == v.dim()}

    def resize(v: Any) -> Any:
        if not isinstance(v, torch.Tensor):
            return v
        shape = shaped.get(id(v)) or tuple(sizes.get(n, n) for n in v.shape)
        return torch.empty(shape, dtype=v.dtype, device="meta")

    return pytree.tree_map(resize, (tuple(args), dict(kwargs)))
