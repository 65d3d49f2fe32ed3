"""Blocks and the capture-time views of a model: which repeats are captured, on what.

A *block* is a child of an ``nn.ModuleList`` (or ``nn.Sequential``) of at least two
callable modules: the transformer layers that FSDP2, activation checkpointing and
regional ``torch.compile`` each wrap one at a time. umup_fx keeps every block as its
own module running its own rewritten graph (``umup_fx.module``), and captures only a
*prefix* of each block list: blocks with the same structure key (class, parameter
and buffer shapes, plain settings such as a sliding-window flag) share one graph, so a
prefix holding two of each key shows the whole model (the second copy checks that
the key really is enough: see ``passes.regions``).

Capture runs on a *shadow*: every parameter and buffer is swapped, for the duration
of the export, for a ``meta`` tensor of its shape, floating ones in float64. No weight
is read or written (a model built on ``meta`` transforms as it is), and the graph
names device and dtype only where the model chose them itself: ``meta`` and float64
in the graph mean "the model's device / dtype", which the rewritten graph reads at
run time from the weights (``passes.regions.generalize_placement``).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from .errors import CaptureError

SHADOW_DEVICE = torch.device("meta")
SHADOW_DTYPE = torch.float64

# Name segments that wrappers add in front of a module's own names: activation
# checkpointing, torch.compile, FSDP1. Plan names never contain them.
_WRAPPER_SEGMENTS = ("_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module")
_WRAPPER_RE = re.compile(r"(^|\.)(" + "|".join(_WRAPPER_SEGMENTS) + r")(?=\.|$)")
# Per-layer counters that do not change what a block computes.
_INDEX_ATTRS = {"layer_idx", "layer_id", "layer_index", "idx", "block_idx", "layer_number",
                "block_id", "index"}


def canonical_name(name: str) -> str:
    """A parameter / module name without wrapper segments (``layers.0._checkpoint_wrapped_
    module.attn`` -> ``layers.0.attn``): the name the plan uses."""
    return _WRAPPER_RE.sub("", name).lstrip(".")


def unwrap(module: nn.Module) -> nn.Module:
    """The module a checkpoint / compile / FSDP1 wrapper holds (the module itself if none)."""
    for attr in _WRAPPER_SEGMENTS:
        inner = module._modules.get(attr)
        if inner is not None:
            return unwrap(inner)
    return module


@dataclass
class BlockList:
    """One list of blocks: ``model.get_submodule(path)[i]`` for ``i`` in ``names``."""

    path: str  # canonical path of the ModuleList / Sequential ("model.layers")
    names: list[str]  # child names in call order ("0", "1", ...)
    keys: list[Any]  # structure key per child
    kept: int = 0  # how many leading children the capture keeps
    template: list[int] = field(default_factory=list)  # child i -> kept child with its graph

    def block_path(self, i: int) -> str:
        return f"{self.path}.{self.names[i]}" if self.path else self.names[i]


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def structure_key(block: nn.Module) -> Any:
    """What must agree for two blocks to share one rewritten graph."""
    parts = []
    for name, module in unwrap(block).named_modules():
        settings = tuple(
            sorted(
                (k, v)
                for k, v in vars(module).items()
                if not k.startswith("_") and k not in _INDEX_ATTRS and _plain(v)
            )
        )
        own = tuple(
            (k, tuple(t.shape), t.dtype)
            for k, t in [*module._parameters.items(), *module._buffers.items()]
            if t is not None
        )
        parts.append((canonical_name(name), type(module), settings, own))
    return tuple(parts)


def find_blocks(model: nn.Module) -> list[BlockList]:
    """The outermost lists of two or more callable modules (the model's layers)."""
    found: list[BlockList] = []
    taken: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) < 2:
            continue
        path = canonical_name(name)
        if any(path == t or path.startswith(t + ".") for t in taken):
            continue
        children = list(module._modules.items())
        if any(
            c is None
            or isinstance(unwrap(c), (nn.ModuleList, nn.ModuleDict))
            or not any(True for _ in c.parameters())
            for _, c in children
        ):
            continue
        found.append(BlockList(path, [k for k, _ in children],
                               [structure_key(c) for _, c in children]))
        taken.append(path)
    return found


def choose_prefix(blocks: BlockList, full: bool = False) -> None:
    """Keep the shortest prefix that holds two blocks of every key (one if it has one);
    with ``full``, every block."""
    need = {k: blocks.keys.count(k) if full else min(2, blocks.keys.count(k)) for k in blocks.keys}
    seen: dict[Any, list[int]] = {}
    kept = 0
    for i, k in enumerate(blocks.keys):
        if all(len(seen.get(key, [])) >= n for key, n in need.items()):
            break
        seen.setdefault(k, []).append(i)
        kept = i + 1
    blocks.kept = kept
    blocks.template = [seen[k][0] if i >= kept else i for i, k in enumerate(blocks.keys)]


@contextlib.contextmanager
def truncated(model: nn.Module, block_lists: list[BlockList]) -> Iterator[None]:
    """Temporarily keep only each list's captured prefix, wrappers taken off."""
    saved = []
    try:
        for b in block_lists:
            container = model.get_submodule(live_path(model, b.path))
            saved.append((container, container._modules))
            kept = [(n, unwrap(container._modules[n])) for n in b.names[: b.kept]]
            container._modules = dict(kept)  # type: ignore[assignment]
        yield
    finally:
        for container, modules in saved:
            container._modules = modules  # type: ignore[assignment]


def live_path(model: nn.Module, canonical: str) -> str:
    """The live module path for a canonical path (wrappers may sit in between)."""
    if not canonical:
        return ""
    for name, _ in model.named_modules():
        if canonical_name(name) == canonical:
            return name
    raise CaptureError(f"umup_fx lost track of submodule {canonical!r}.")


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
