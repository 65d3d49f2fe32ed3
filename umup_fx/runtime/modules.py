"""The transformed model at run time: the same module tree, each region running its graph.

``transform`` rewrites a model *in place*. The root and every block get a subclass of
their own class (``UmupLlama(UmupModule, Llama)``, ``UmupBlock(UmupRegion, Block)``)
whose ``forward`` runs the region's rewritten graph; names, parameters, buffers,
submodules and ``isinstance`` stay as they were. Blocks of one structure share one
class and one graph (so ``torch.compile`` of each block compiles once); what differs
per block, its residual taus, is a list of floats on the instance.

Each call reads the module's parameters at call time, by path: FSDP2's unsharded
parameters, a checkpoint wrapper's recompute and ``.to()`` moves are all seen.

A module keeps one graph per *call structure* (which arguments are given, nested how,
and the values of the non-tensor ones): the root's first call with a structure it has
no graph for captures one (``_umup_recapture``, set by ``transform``; at most
``MAX_CALL_STRUCTURES``); blocks get the graphs the root's captures make for them.
The installed forward keeps the original's signature (``inspect.signature``).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.utils._pytree as pytree
import torch.utils.checkpoint
from torch import fx, nn

from umup_fx.errors import CallError, GraphRunError, UmupError
from umup_fx.runtime import saved_state
from umup_fx.runtime.graph_errors import explain_graph_error, mark_reported
from umup_fx.runtime.names import canonical_name, unwrap

if TYPE_CHECKING:
    from umup_fx.plan import Plan  # the compiler's data; read here, never built

class _TensorLeaf:
    """The marker of a flattened call leaf that the graph takes as a placeholder. One
    object that copies and pickles as itself: a deep-copied model's call keys still
    match its calls (a fresh ``object()`` per copy made every call a new structure)."""

    def __repr__(self) -> str:
        return "TENSOR"

    def __reduce__(self) -> str:
        return "TENSOR"

    def __copy__(self) -> _TensorLeaf:
        return self

    def __deepcopy__(self, memo: dict) -> _TensorLeaf:
        return self


TENSOR = _TensorLeaf()


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
    differ = [f"{len(want_args)} positional argument(s), not {len(args)}"] if len(
        want_args) != len(args) else []
    missing, extra = sorted(set(want_kwargs) - set(kwargs)), sorted(set(kwargs) - set(want_kwargs))
    differ += [f"keyword arguments {missing} too"] if missing else []
    differ += [f"no keyword arguments {extra}"] if extra else []
    return CallError(
        f"This u-muP {type(module).__name__} ({rg.name}) was captured for calls with "
        f"{', '.join(differ) or 'these arguments'}: {why}."
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


# Root graphs a model keeps, one per call structure. One more is a CallError, not an
# eviction: a structure that changes on every call (a non-tensor argument that counts
# steps) would otherwise capture on every call, seconds each, without a word.
MAX_CALL_STRUCTURES = 8


def tensor_kind(x: torch.Tensor) -> tuple[int, str]:
    """What a graph is traced for about a tensor input besides its sizes: its number of
    axes and its dtype's kind (export specialises both; a float where integers were
    captured would run a ``.to(device)`` the graph turned into a cast to int64)."""
    kind = ("bool" if x.dtype is torch.bool else "complex" if x.is_complex()
            else "float" if x.is_floating_point() else "int")
    return x.dim(), kind


def call_key(args: tuple, kwargs: dict) -> tuple[pytree.TreeSpec, list[Any], list[Any]]:
    """A call's structure: its argument tree (keywords in name order), the values of its
    non-tensor leaves (tensors, of any size, stand as ``TENSOR``) and each tensor leaf's
    ``tensor_kind`` (None elsewhere)."""
    flat, spec = pytree.tree_flatten((tuple(args), {k: kwargs[k] for k in sorted(kwargs)}))
    return (spec, [TENSOR if isinstance(x, torch.Tensor) or x is TENSOR else x for x in flat],
            [tensor_kind(x) if isinstance(x, torch.Tensor) else None for x in flat])


def _graph_key(rg: RegionGraph) -> tuple[pytree.TreeSpec, list[Any], list[Any]]:
    """``call_key`` of the calls ``rg`` takes; a tensor leaf the graph never reads takes
    any kind (None)."""
    kinds: list[Any] = [None] * len(rg.leaves)
    placeholders = [n for n in rg.gm.graph.nodes if n.op == "placeholder"]
    for node, (source, i) in zip(placeholders, rg.inputs, strict=False):
        val = node.meta.get("val")
        if source == "input" and isinstance(val, torch.Tensor):
            kinds[i] = tensor_kind(val)
    order = list(range(len(rg.leaves)))
    args, kwargs = pytree.tree_unflatten(order, rg.in_spec)
    spec, _, _ = call_key(args, kwargs)  # the leaves in call_key's order (keywords sorted)
    index = pytree.tree_leaves((tuple(args), {k: kwargs[k] for k in sorted(kwargs)}))
    return spec, [rg.leaves[i] for i in index], [kinds[i] for i in index]


def _same_key(a: tuple, b: tuple) -> bool:
    if a[0] != b[0] or len(a[1]) != len(b[1]):
        return False
    for x, y, kx, ky in zip(a[1], b[1], a[2], b[2], strict=True):
        if (x is TENSOR) != (y is TENSOR):
            return False
        if x is not TENSOR and (type(x) is not type(y) or x != y):
            return False
        if kx is not None and ky is not None and kx != ky:
            return False
    return True


def graphs_of(module: nn.Module) -> list[RegionGraph]:
    """Every graph ``module`` runs, one per call structure, the transform-time one first."""
    return [rg for _, rg, _ in module.__dict__.get("_umup_graphs", [])]


def graph_for(module: nn.Module, args: tuple, kwargs: dict) -> RegionGraph | None:
    """The graph ``module`` runs for this call's structure, or None."""
    key = call_key(args, kwargs)
    for k, rg, _ in module.__dict__["_umup_graphs"]:
        if _same_key(k, key):
            return rg
    return None


def own_error(module: nn.Module, args: tuple, kwargs: dict) -> BaseException | None:
    """The error ``module`` as written (its own class and its blocks', no grad) raises on
    this call, marked as the user's; None when it runs it. The trial leaves no trace:
    buffers (batch-norm statistics) and the RNG streams are as before."""
    buffers = [(b, b.clone()) for b in module.buffers()]
    devices = sorted({b.device.index or 0 for b, _ in buffers if b.device.type == "cuda"} |
                     {p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices), as_written(module), torch.no_grad():
            module(*args, **kwargs)
    except Exception as own:  # noqa: BLE001 - the model's own error for this call
        return mark_reported(own)
    finally:
        with torch.no_grad():
            for b, before in buffers:
                b.copy_(before)
    return None


def _select(module: nn.Module, args: tuple, kwargs: dict) -> RegionGraph:
    rg = graph_for(module, args, kwargs)
    if rg is not None:
        return rg
    first = module.__dict__["_umup_region"]
    recapture = module.__dict__.get("_umup_recapture")
    if recapture is None:
        raise _call_error(first, module, args, kwargs,
                          "a submodule runs the graphs its model's captures made for it; "
                          "call the model, and the model calls its submodules")
    if len(module.__dict__["_umup_graphs"]) >= MAX_CALL_STRUCTURES:
        raise CallError(
            f"This u-muP {type(module).__name__} was called with {MAX_CALL_STRUCTURES + 1} "
            "different call structures (arguments given, and the values of non-tensor "
            f"ones); it keeps at most {MAX_CALL_STRUCTURES} graphs "
            "(umup_fx.runtime.modules.MAX_CALL_STRUCTURES). Pass values that change "
            "between calls as tensors, or keep them fixed."
        )
    torch.compiler.disable(recapture)(module, args, kwargs)
    rg = graph_for(module, args, kwargs)
    if rg is None:
        raise _call_error(first, module, args, kwargs, "the new capture did not take this call")
    return rg


# Exceptions torch raises through a region's graph on purpose, passed on as they are.
_CONTROL_FLOW = (torch.utils.checkpoint._StopRecomputationError,)


def run_region(module: nn.Module, rg: RegionGraph, args: tuple, kwargs: dict) -> Any:
    """Call ``rg``'s graph for ``module(*args, **kwargs)`` and rebuild its output."""
    flat = _flatten_call(rg, module, args, kwargs)
    placement = None
    values: list[Any] = []
    constants = next(c for _, g, c in module.__dict__["_umup_graphs"] if g is rg)
    for kind, target in rg.inputs:
        if kind == "input":
            values.append(flat[target])
        elif kind in ("param", "buffer"):
            values.append(_resolve(module, target))
        elif kind == "constant":
            values.append(getattr(module, constants[target]))
        elif kind == "training":
            values.append(module.training)
        elif kind == "module":
            values.append(module)
        elif kind == "taus":
            values.append(module.__dict__["_umup_taus"])
        else:  # "device" / "dtype"
            placement = placement or _placement(module, flat)
            values.append(placement[0] if kind == "device" else placement[1])
    if torch.compiler.is_compiling():  # no try block in what Dynamo traces
        results = rg.gm(*values) if graph_runner is None else graph_runner(module, rg, values)
    else:
        try:
            results = rg.gm(*values) if graph_runner is None else graph_runner(module, rg, values)
        except _CONTROL_FLOW:
            raise  # checkpoint's recompute stops early by raising: not a failure
        except Exception as exc:
            own = None if isinstance(exc, UmupError) else own_error(module, args, kwargs)
            error = explain_graph_error(module, rg.gm, exc, own)
            if error is exc:
                raise
            # The model's own error for this call stands alone; ours chains the graph's.
            raise error from (exc if isinstance(error, GraphRunError) else None)
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
    """Mixin of a module that runs a rewritten graph (a block, or the root); its class
    (``_subclass``) gets the forward, with the original's signature."""

    @property
    def graph_module(self) -> fx.GraphModule:
        """This module's rewritten graph (``.code`` shows it) for the transform's call;
        ``graphs_of(module)`` lists those of other call structures too."""
        return self.__dict__["_umup_region"].gm


class UmupBlock(UmupRegion):
    """A block rewritten to u-muP (its residual taus: ``_umup_taus``)."""


class UmupSubmodule(UmupRegion):
    """A submodule the rewritten forward calls (a linear, a norm, an attention): its
    forward runs its part of the rewritten graph, so hooks on it, FSDP2's unshard and
    tensor parallel's redistribution run as they do for the original."""


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

    # How it was transformed travels with its state_dict (runtime/saved_state.py).
    def get_extra_state(self) -> torch.Tensor:
        return saved_state.encode({**saved_state.settings(self), "form": "unit"})

    def set_extra_state(self, state: Any) -> None:
        pass  # checked (and a folded folder restored) in _load_from_state_dict, first

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        saved_state.before_load(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args)

    @property
    def inlined_calls(self) -> dict[str, str]:
        """Submodules the original forward called whose ops run inside their caller's
        graph (the rewrite fused them: a gated unit's activation module), with why;
        every other submodule it called is called, so its hooks fire."""
        return dict(self.__dict__.get("_umup_inlined", {}))

    def region_graphs(self) -> dict[str, fx.GraphModule]:
        """Every region's rewritten graph by module path ("" for the root), blocks
        included, for the transform's call (``graphs_of(module)``: every structure's)."""
        return {
            canonical_name(name): m.__dict__["_umup_region"].gm
            for name, m in self.named_modules()
            if isinstance(m, UmupRegion)
        }


def _subclass(cls: type, mixin: type) -> type:
    key = (cls, mixin)
    if key not in _CLASSES:

        def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            return run_region(self, _select(self, args, kwargs), args, kwargs)

        # Callers read the signature (HF Trainer keeps the dataset columns it names and
        # passes num_items_in_batch when it has **kwargs; generate checks arguments).
        forward.__signature__ = inspect.signature(cls.forward)  # type: ignore[attr-defined]
        forward.__doc__ = cls.forward.__doc__
        _CLASSES[key] = type(f"Umup{cls.__name__}", (mixin, cls),
                             {"__module__": cls.__module__, "forward": forward})
    return _CLASSES[key]


def _written_class(cls: type) -> type:
    """The model's own class under its ``Umup`` subclass (and any wrapper's on top)."""
    for c in cls.__mro__:
        for (original, _), sub in _CLASSES.items():
            if sub is c:
                return original
    return cls


@contextlib.contextmanager
def as_written(model: nn.Module) -> Iterator[None]:
    """Run ``model``'s own forwards (not the rewritten graphs) while inside: a new call
    structure is captured on the code the user wrote."""
    swapped = [(m, type(m)) for m in model.modules() if isinstance(m, UmupRegion)]
    try:
        for m, cls in swapped:
            m.__class__ = _written_class(cls)
        yield
    finally:
        for m, cls in swapped:
            m.__class__ = cls


def add_graph(module: nn.Module, rg: RegionGraph) -> None:
    """Let ``module`` run ``rg`` for calls of the structure ``rg`` was captured for (its
    tensor constants become non-persistent buffers of the module); a module that has a
    graph for that structure keeps it."""
    graphs = module.__dict__.setdefault("_umup_graphs", [])
    key = _graph_key(rg)
    if any(_same_key(key, k) for k, _, _ in graphs):
        return
    taken = sum(len(c) for _, _, c in graphs)
    names = {}
    for i, (name, value) in enumerate(rg.constants.items()):
        names[name] = f"_umup_constant_{taken + i}"
        module.register_buffer(names[name], value.clone(), persistent=False)
    graphs.append((key, rg, names))


def _attach(module: nn.Module, rg: RegionGraph, mixin: type) -> None:
    module.__dict__["_umup_region"] = rg
    module.__dict__["_umup_graphs"] = []
    add_graph(module, rg)
    module.__class__ = _subclass(type(module), mixin)


def install_block(block: nn.Module, rg: RegionGraph, taus: list[float]) -> None:
    """Make ``block`` (or the module its wrapper holds) run ``rg`` with ``taus``."""
    inner = unwrap(block)
    _attach(inner, rg, UmupBlock)
    inner.__dict__["_umup_taus"] = list(taus)


def install_submodule(module: nn.Module, rg: RegionGraph) -> None:
    """Make ``module`` (or the module its wrapper holds) run ``rg`` when called."""
    _attach(unwrap(module), rg, UmupSubmodule)


def install_root(
    model: nn.Module,
    rg: RegionGraph,
    plan: Plan,
    original: fx.GraphModule,
    recapture: Callable[[nn.Module, tuple, dict], None] | None = None,
    settings: dict[str, Any] | None = None,
    mixin: type[UmupModule] = UmupModule,
    inlined: dict[str, str] | None = None,
) -> None:
    """Make ``model`` run ``rg``; ``recapture(model, args, kwargs)`` adds the graphs of a
    call structure it has none for (``add_graph``); ``settings`` (how it was transformed)
    go into its state_dict; ``mixin`` may add methods (a Hugging Face model's save);
    ``inlined``: the submodules whose calls run inside their caller's graph, with why."""
    _attach(model, rg, mixin)
    model.__dict__["_umup_settings"] = dict(settings or {})
    model.__dict__["_umup_inlined"] = dict(inlined or {})
    model.__dict__["_umup_plan"] = plan
    model.__dict__["_umup_original"] = original
    model.__dict__["_umup_recapture"] = recapture


def is_transformed(module: nn.Module) -> bool:
    return isinstance(module, UmupRegion)
