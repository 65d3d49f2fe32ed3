"""A per-process memo of the capture's ``torch.export`` call, for the test suite only.

Most of the suite's time was ``torch.export`` (about 3 s for a tiny HF Llama on a 2-core
CPU, 90% of a transform), and most tests transform a fresh instance of a model that an
earlier test in the same worker exported already. The capture exports a *shadow* of the
model (``capture/shadow.py``: every weight a ``meta`` stand-in), so its program depends
on the model's structure and attributes and on the example inputs, never on weight
values: replaying a deep copy of the earlier program gives the graph a fresh export
gives (``tests/test_export_cache.py`` checks that, and that a changed attribute misses).

The key is conservative: the class and every plain attribute of every submodule (an
object it cannot name, such as a hook or a bound method, goes in by identity, so it
misses rather than matches wrongly), each parameter's and buffer's shape, dtype, device
and ``requires_grad`` (small buffers by value too, and the inputs where the export
reads them: not on the shadow, whose inputs are ``meta`` too), the input tree,
the kept block prefix and whether it ran on the shadow. A capture that recorded an
activation checkpoint is never stored (the record points at the model's own modules),
and a failed export is never stored. ``UMUP_FX_TEST_EXPORT_CACHE=0`` turns it off;
``umup_fx`` itself never caches.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from umup_fx.capture import trace

_SMALL = 1 << 16  # tensors up to this many elements enter the key by value
_store: dict[Any, tuple[Any, Any]] = {}
stats = {"hits": 0, "misses": 0}


def _digest(t: torch.Tensor) -> str:
    if t.is_meta or t.numel() > _SMALL:
        return "-"
    return hashlib.sha1(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()
                        .tobytes()).hexdigest()


def _spec(t: torch.Tensor, values: bool) -> tuple:
    return ("tensor", tuple(t.shape), t.dtype, t.device.type, t.requires_grad,
            _digest(t) if values else None)


def _freeze(v: Any, refs: list, depth: int = 0, values: bool = True) -> Any:
    """A hashable stand-in for ``v``: its value where it is plain data, else its identity
    (``v`` itself kept in ``refs``, so that no later object can take over its id)."""
    if v is None or isinstance(v, (bool, int, float, str, bytes, torch.dtype, torch.device,
                                   torch.Size, type)):
        return v
    if isinstance(v, torch.Tensor):
        return _spec(v, values)
    if depth > 4:
        refs.append(v)
        return ("id", id(v))
    if isinstance(v, (tuple, list)):
        return (type(v).__name__, tuple(_freeze(x, refs, depth + 1, values) for x in v))
    if isinstance(v, (set, frozenset)):
        return ("set", tuple(sorted((_freeze(x, refs, depth + 1, values) for x in v), key=repr)))
    if isinstance(v, dict):
        return ("dict", tuple((str(k), _freeze(x, refs, depth + 1, values)) for k, x in v.items()))
    if type(v).__name__.endswith("Config") and hasattr(v, "__dict__"):  # transformers
        return ("config", type(v), _freeze(vars(v), refs, depth + 1))
    refs.append(v)  # a function too: a module-level one keeps its id, a lambda is its own
    return ("id", type(v), id(v))


def _module_key(model: nn.Module, refs: list) -> tuple:
    parts = []
    for name, m in model.named_modules(remove_duplicate=False):
        attrs = {k: v for k, v in vars(m).items()
                 if k not in ("_parameters", "_buffers", "_modules")}
        parts.append((name, type(m), _freeze(attrs, refs)))
    parts.append(tuple((n, _spec(p, values=False)) for n, p in model.named_parameters(
        remove_duplicate=False)))  # the export reads no weight: shapes only
    parts.append(tuple((n, _freeze(b, refs)) for n, b in model.named_buffers(
        remove_duplicate=False)))
    return tuple(parts)


def _copy(program: Any) -> Any:
    with warnings.catch_warnings():  # torch 2.13's pytree deprecation, from inside torch
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(program)


def _cached_export(model: nn.Module, args: tuple, kwargs: dict, block_lists: list,
                   preserve: tuple[str, ...], shadow: bool) -> Any:
    refs: list = []
    key = (_module_key(model, refs), _freeze(args, refs, values=not shadow),
           _freeze(kwargs, refs, values=not shadow), preserve,
           shadow, tuple(b.kept for b in block_lists), torch.is_grad_enabled(),
           torch.get_default_dtype(), torch.is_autocast_enabled("cpu"))
    if key in _store:
        stats["hits"] += 1
        program, why, _ = _store[key]
        return _copy(program), why
    stats["misses"] += 1
    # what the capture records of activation checkpoints (its own recorder, nested)
    with trace._recording_checkpoints() as checkpointed:
        program, why = _original(model, args, kwargs, block_lists, preserve, shadow)
    if not checkpointed:
        _store[key] = (_copy(program), why, refs)
    return program, why


_original = trace._export


def install() -> None:
    """Route the capture's export through the memo (unless turned off)."""
    if os.environ.get("UMUP_FX_TEST_EXPORT_CACHE", "1") != "0":
        trace._export = _cached_export


@contextlib.contextmanager
def _routed(export: Any) -> Iterator[None]:
    saved, trace._export = trace._export, export
    try:
        yield
    finally:
        trace._export = saved


def installed() -> contextlib.AbstractContextManager[None]:
    """The memo on for a block, whatever the environment says (for its own test)."""
    return _routed(_cached_export)


def uninstalled() -> contextlib.AbstractContextManager[None]:
    """The capture exports for real in a block (for the memo's own test)."""
    return _routed(_original)
