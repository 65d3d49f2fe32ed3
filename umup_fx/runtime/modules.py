"""The transformed model at run time: the same module tree, each region running its graph.

``transform`` rewrites a model *in place*. The root and every block get a subclass of
their own class (``UmupLlama(UmupModule, Llama)``, ``UmupBlock(UmupRegion, Block)``)
whose ``forward`` runs the region's rewritten graph; names, parameters, buffers,
submodules and ``isinstance`` stay as they were. Blocks of one structure share one
class and one graph (so ``torch.compile`` of each block compiles once); what differs
per block, its residual taus, is a list of floats on the instance.

Each call reads the module's parameters at call time, by path: FSDP2's unsharded
parameters, a checkpoint wrapper's recompute and ``.to()`` moves are all seen.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from umup_fx.errors import CallError
from umup_fx.runtime.names import canonical_name, unwrap

if TYPE_CHECKING:
    from umup_fx.plan import Plan  # the compiler's data; read here, never built

TENSOR = object()  # a flattened call leaf that the graph takes as a placeholder


@dataclass
class RegionGraph:
    """A rewritten graph plus how to feed it from a module and a call's arguments.

    ``inputs`` says, per placeholder, where its value comes from: ``("input", i)`` the
    i-th flattened call leaf; ``("param" | "buffer", path)`` the module's tensor at a
    path relative to it; ``("constant", name)``; ``("training" | "module" | "taus" |
    "device" | "dtype", None)``. ``outputs`` is ``("user", None)`` or ``("buffer", path)``
    per graph output (buffer updates are written back).
    """

    gm: fx.GraphModule
    inputs: list[tuple[str, Any]]
    outputs: list[tuple[str, Any]]
    in_spec: pytree.TreeSpec
    leaves: list[Any]  # per call leaf: TENSOR, or the value the graph was captured with
    out_spec: pytree.TreeSpec
    out_leaves: list[Any]  # per output leaf: TENSOR, or its constant value
    constants: dict[str, torch.Tensor] = field(default_factory=dict)
    name: str = "model"



def dtype_limit(dtype: torch.dtype, which: str) -> float:
    """``torch.finfo(dtype).min`` / ``.max``, for the model's run-time dtype."""
    return float(getattr(torch.finfo(dtype), which))


_CLASSES: dict[tuple[type, type], type] = {}
# Runs a region's graph: None means ``rg.gm(*values)``. ``umup_fx.diagnose.tracking`` swaps in
# an interpreter that records every op's scale.
graph_runner: Callable[[nn.Module, RegionGraph, list[Any]], Any] | None = None


def _resolve(module: nn.Module, path: str) -> Any:
    for part in path.split("."):
        module = getattr(unwrap(module), part)
    return module


def _placement(module: nn.Module, flat: list[Any]) -> tuple[torch.device, torch.dtype]:
    """The device and dtype "the model's" in the graph stand for: its weights'."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    for x in flat:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            return x.device, x.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def _call_error(rg: RegionGraph, module: nn.Module, args: tuple, kwargs: dict, why: str) -> CallError:
    want_args, want_kwargs = pytree.tree_unflatten([None] * rg.in_spec.num_leaves, rg.in_spec)
    return CallError(
        f"This u-muP {type(module).__name__} ({rg.name}) was captured for calls with "
        f"{len(want_args)} positional argument(s) and keyword arguments "
        f"{list(want_kwargs)}; it got {len(args)} positional and {sorted(kwargs)}: {why}. "
        "The graph is fixed at transform time: transform with example inputs of the call "
        "you make (for example include the targets if the model computes its loss)."
    )


def _flatten_call(rg: RegionGraph, module: nn.Module, args: tuple, kwargs: dict) -> list[Any]:
    _, want_kwargs = pytree.tree_unflatten([None] * rg.in_spec.num_leaves, rg.in_spec)
    if set(kwargs) != set(want_kwargs):
        raise _call_error(rg, module, args, kwargs, "other keyword arguments")
    flat, spec = pytree.tree_flatten((tuple(args), {k: kwargs[k] for k in want_kwargs}))
    if spec != rg.in_spec:
        raise _call_error(rg, module, args, kwargs, "another argument structure")
    for i, (value, captured) in enumerate(zip(flat, rg.leaves, strict=True)):
        if captured is TENSOR:
            continue
        if isinstance(value, torch.Tensor) or value != captured:
            raise _call_error(
                rg, module, args, kwargs,
                f"argument leaf {i} was {captured!r} at capture and is {value!r} now "
                "(non-tensor arguments are baked into the graph)",
            )
    return flat


def run_region(module: nn.Module, rg: RegionGraph, args: tuple, kwargs: dict) -> Any:
    """Call ``rg``'s graph for ``module(*args, **kwargs)`` and rebuild its output."""
    flat = _flatten_call(rg, module, args, kwargs)
    placement = None
    values: list[Any] = []
    for kind, target in rg.inputs:
        if kind == "input":
            values.append(flat[target])
        elif kind in ("param", "buffer"):
            values.append(_resolve(module, target))
        elif kind == "constant":
            values.append(getattr(module, module.__dict__["_umup_constants"][target]))
        elif kind == "training":
            values.append(module.training)
        elif kind == "module":
            values.append(module)
        elif kind == "taus":
            values.append(module.__dict__["_umup_taus"])
        else:  # "device" / "dtype"
            placement = placement or _placement(module, flat)
            values.append(placement[0] if kind == "device" else placement[1])
    results = rg.gm(*values) if graph_runner is None else graph_runner(module, rg, values)
    user = []
    for (kind, target), value in zip(rg.outputs, results, strict=True):
        if kind == "buffer":
            with torch.no_grad():
                _resolve(module, target).copy_(value)
        else:
            user.append(value)
    if rg.out_leaves:
        it = iter(user)
        user = [next(it) if v is TENSOR else v for v in rg.out_leaves]
    return pytree.tree_unflatten(user, rg.out_spec)


class UmupRegion(nn.Module):
    """Mixin of a module that runs a rewritten graph (a block, or the root)."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return run_region(self, self.__dict__["_umup_region"], args, kwargs)

    @property
    def graph_module(self) -> fx.GraphModule:
        """This module's rewritten graph (``.code`` shows it)."""
        return self.__dict__["_umup_region"].gm


class UmupBlock(UmupRegion):
    """A block rewritten to u-muP (its residual taus: ``_umup_taus``)."""


class UmupModule(UmupRegion):
    """A model rewritten to u-muP, in place: same class (subclassed), names and tree.

    Attributes:
        umup_plan: the ``Plan`` (``print(model.umup_plan)`` or ``umup_fx.explain``).
        graph_module: the root's rewritten graph; blocks have their own.
        original_graph: the captured graph before the rewrite, for comparison.
    """

    @property
    def umup_plan(self) -> Plan:
        return self.__dict__["_umup_plan"]

    @property
    def original_graph(self) -> fx.GraphModule:
        return self.__dict__["_umup_original"]

    def region_graphs(self) -> dict[str, fx.GraphModule]:
        """Every rewritten graph by module path ("" for the root), blocks included."""
        return {
            canonical_name(name): m.__dict__["_umup_region"].gm
            for name, m in self.named_modules()
            if isinstance(m, UmupRegion)
        }


def _subclass(cls: type, mixin: type) -> type:
    key = (cls, mixin)
    if key not in _CLASSES:
        _CLASSES[key] = type(f"Umup{cls.__name__}", (mixin, cls), {"__module__": cls.__module__})
    return _CLASSES[key]


def _attach(module: nn.Module, rg: RegionGraph, mixin: type) -> None:
    module.__dict__["_umup_region"] = rg
    names = {}
    for i, (name, value) in enumerate(rg.constants.items()):
        names[name] = f"_umup_constant_{i}"
        module.register_buffer(names[name], value.clone(), persistent=False)
    module.__dict__["_umup_constants"] = names
    module.__class__ = _subclass(type(module), mixin)


def install_block(block: nn.Module, rg: RegionGraph, taus: list[float]) -> None:
    """Make ``block`` (or the module its wrapper holds) run ``rg`` with ``taus``."""
    inner = unwrap(block)
    _attach(inner, rg, UmupBlock)
    inner.__dict__["_umup_taus"] = list(taus)


def install_root(model: nn.Module, rg: RegionGraph, plan: Plan, original: fx.GraphModule) -> None:
    _attach(model, rg, UmupModule)
    model.__dict__["_umup_plan"] = plan
    model.__dict__["_umup_original"] = original


def is_transformed(module: nn.Module) -> bool:
    return isinstance(module, UmupRegion)
