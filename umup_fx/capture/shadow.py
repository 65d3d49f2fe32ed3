"""The shadow a model is captured on: every parameter and buffer swapped, for the
duration of the export, for a ``meta`` tensor of its shape (floating ones float64).
No weight is read or written, and ``meta`` / float64 in the graph mean "the model's
device / dtype", read at run time from the weights
(``passes.placement.generalize_placement``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from umup_fx.errors import CaptureError

SHADOW_DEVICE = torch.device("meta")
SHADOW_DTYPE = torch.float64


def _shadow_tensor(t: torch.Tensor) -> torch.Tensor:
    dtype = SHADOW_DTYPE if t.is_floating_point() else t.dtype
    return torch.empty(t.shape, dtype=dtype, device=SHADOW_DEVICE)


def _check_plain(name: str, t: torch.Tensor) -> None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return
    if isinstance(t, DTensor):
        raise CaptureError(
            f"{name} is a DTensor: the model was sharded (fully_shard / tensor parallel) "
            "before umup_fx.transform. Transform the unsharded model (on 'meta' if it is "
            "large), then fully_shard it."
        )


@contextlib.contextmanager
def shadowed(model: nn.Module) -> Iterator[None]:
    """Swap every parameter and buffer for a meta float64 stand-in (ties kept)."""
    swaps: list[tuple[dict, str, Any]] = []
    by_id: dict[int, torch.Tensor] = {}
    try:
        for mod_name, module in model.named_modules(remove_duplicate=False):
            for store in (module._parameters, module._buffers):
                for key, t in list(store.items()):
                    if t is None:
                        continue
                    _check_plain(f"{mod_name}.{key}".lstrip("."), t)
                    stand_in = by_id.get(id(t))
                    if stand_in is None:
                        stand_in = _shadow_tensor(t.data if isinstance(t, nn.Parameter) else t)
                        if isinstance(t, nn.Parameter):
                            stand_in = nn.Parameter(stand_in, requires_grad=t.requires_grad)
                        by_id[id(t)] = stand_in
                    swaps.append((store, key, t))
                    store[key] = stand_in
        yield
    finally:
        for store, key, t in reversed(swaps):
            store[key] = t


def shadow_inputs(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Example inputs as meta tensors (floating ones float64), same structure."""

    def conv(x: Any) -> Any:
        return _shadow_tensor(x) if isinstance(x, torch.Tensor) else x

    return pytree.tree_map(conv, (args, kwargs))
