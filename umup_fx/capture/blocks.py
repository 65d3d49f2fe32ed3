"""Blocks and the capture-time views of a model: which repeats are captured, on what.

A *block* is a child of an ``nn.ModuleList``, ``nn.ModuleDict`` (torchtitan's
``self.layers``) or ``nn.Sequential`` of at least two callable modules: the transformer layers that FSDP2, activation checkpointing and
regional ``torch.compile`` each wrap one at a time. umup_fx keeps every block as its
own module running its own rewritten graph (``umup_fx.runtime.modules``), and captures only a
*prefix* of each block list: blocks with the same structure key (class, parameter
and buffer shapes, plain settings such as a sliding-window flag) share one graph, so a
prefix holding two of each key shows the whole model (the second copy checks that
the key really is enough: see ``passes.cut_regions``). Capture runs on a shadow of
the model (``capture.shadow``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from umup_fx.errors import CaptureError
from umup_fx.runtime.names import canonical_name, unwrap

# Per-layer counters that do not change what a block computes.
_INDEX_ATTRS = {"layer_idx", "layer_id", "layer_index", "idx", "block_idx", "layer_number",
                "block_id", "index"}


@dataclass
class BlockList:
    """One list of blocks: ``model.get_submodule(path)[i]`` for ``i`` in ``names``."""

    path: str  # canonical path of the ModuleList / ModuleDict / Sequential ("model.layers")
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


_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)


def find_blocks(model: nn.Module) -> list[BlockList]:
    """The outermost containers of two or more callable modules (the model's layers)."""
    found: list[BlockList] = []
    taken: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, _CONTAINERS) or len(module) < 2:
            continue
        path = canonical_name(name)
        if any(path == t or path.startswith(t + ".") for t in taken):
            continue
        children = list(module._modules.items())
        if any(
            c is None
            or isinstance(unwrap(c), (nn.ModuleList, nn.ModuleDict))  # a table, not layers
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


def callable_modules(model: nn.Module) -> list[str]:
    """Live paths of the submodules a forward may call, each kept as a call of its own
    (``passes.cut_regions``): every module but ``ModuleList`` / ``ModuleDict`` (never
    called) and wrappers (the module they hold is)."""
    from torch.nn.utils import parametrize

    # A parametrization (weight norm's g * v / ||v||) runs when its weight is read, not
    # as a call of the forward: it stays in the graph of the module that reads it.
    skip = {id(inner) for m in model.modules() if isinstance(m, parametrize.ParametrizationList)
            for inner in m.modules()}
    return [name for name, module in model.named_modules()
            if name and not isinstance(module, (nn.ModuleList, nn.ModuleDict))
            and unwrap(module) is module and id(module) not in skip]


def unlisted_repeats(model: nn.Module) -> list[str]:
    """Sibling submodules of one structure held as plain attributes, not in a container
    (``self.block1``, ``self.block2``): blocks umup_fx cannot keep as modules of their own.
    Leaf modules (two linears of one shape) are not blocks."""
    repeats: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, _CONTAINERS):
            continue
        by_key: dict[Any, list[str]] = {}
        for child_name, child in module._modules.items():
            if child is None or not unwrap(child)._modules or not any(True for _ in child.parameters()):
                continue
            by_key.setdefault(structure_key(child), []).append(
                canonical_name(f"{name}.{child_name}" if name else child_name))
        repeats += [n for names in by_key.values() if len(names) >= 2 for n in names]
    return repeats

