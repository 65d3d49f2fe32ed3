"""The ``"umup"`` ``torch.compile`` backend: the same passes as ``transform``, then Inductor.

    compiled = torch.compile(model, backend="umup")        # rewrite at first call
    opt = umup_fx.AdamW(compiled)                          # groups resolved at that call

At the first compile the backend analyses the graph Dynamo captured, unit-initialises
its parameters in place, marks them (later recompiles keep their values and options),
fills in the LR groups of optimizers built earlier (``optim`` module docstring) and
sets ``model.umup_plan`` (so ``umup_fx.explain(compiled)`` works, as after
``transform``). A new batch or sequence size needs no ``dynamic=False``: the graph
Dynamo then makes dynamic is compiled once per concrete size (``_per_shape``), every
one with the model's reference sizes (rules §3): the first compile's input shapes, or
``prepare``'s example inputs', kept as ``model.umup_reference_shapes``.
Its analysis sees what Dynamo gives it: the whole model without graph breaks, pieces
with them (depth and tau are then per piece). ``prepare(model, example_inputs)``
before compiling does the analysis and init on the whole model instead, eagerly.
``torch.compile(umup_fx.transform(model, ...))`` is the third route.

Options (``torch.compile(..., options={...})``): ``hparams``, ``fp8``, ``roles``,
``trainable_norms``, ``reinit`` (as ``transform``) and ``inner`` (a compiler callable
or backend name; Inductor by default). After ``prepare`` only ``hparams`` and ``fp8``,
which change only the graph, may be given. Set
``UMUP_FX_DUMP=<dir>`` to write every graph before and after the rewrite (``.py``
code, and ``.svg`` if pydot is installed).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.export.graph_signature import InputKind

from umup_fx import meta
from umup_fx.capture.reference import dynamo_input_name, dynamo_inputs_at_reference
from umup_fx.capture.trace import capture, capture_dynamo_graph, dynamo_sources
from umup_fx.errors import UmupError
from umup_fx.options import Options
from umup_fx.pipeline import plan_graph, run_pipeline
from umup_fx.plan import Plan, expand_blocks
from umup_fx.runtime.init import initialise
from umup_fx.runtime.optim import resolve_pending_groups
from umup_fx.transform import TRANSFORMED_ATTR, ReferenceSizeWarning, _reference_of, check_fresh

_OPTIONS_ATTR = "_umup_options"
# The model's reference sizes (rules §3): each forward argument's shape at prepare's
# example inputs or the first compile, kept for every later compile of the model.
REFERENCE_ATTR = "umup_reference_shapes"
compiled_plans: list[Plan] = []  # every graph the backend rewrote, in order (inspection)


def prepare(model: nn.Module, example_inputs: Any, example_kwargs: dict | None = None,
            *, hparams: Any = None, **options: Any) -> nn.Module:
    """Ready ``model`` for ``torch.compile(model, backend="umup")``, in place.

    Runs the analysis, re-initialises weights to unit scale, freezes non-parametric
    norm gains, and attaches the plan (``model.umup_plan``) so ``umup_fx.AdamW`` /
    ``param_groups`` work before the first compiled call. Returns ``model``.
    """
    check_fresh(model)
    opts = _u_mup_only(Options.build(hparams, **options))
    captured = capture(model, example_inputs, example_kwargs)
    plan = plan_graph(captured.gm, opts, captured.model_name)
    expand_blocks(plan, captured.gm, captured.blocks)
    initialise(model, plan, opts.reinit)
    for p in model.parameters():
        setattr(p, _OPTIONS_ATTR, opts)
    model.umup_plan = plan  # type: ignore[assignment]
    setattr(model, REFERENCE_ATTR, _reference_of(model, example_inputs, example_kwargs))
    return model


# Options that only change the rewritten graph; the others (roles, trainable_norms,
# reinit) decide init, frozen parameters and LR groups, which prepare() already fixed.
_GRAPH_ONLY = ("hparams", "fp8")


def _u_mup_only(opts: Options) -> Options:
    if opts.parametrization != "umup":
        raise UmupError(
            f"parametrization={opts.parametrization!r} is a baseline for comparisons: build it "
            "with umup_fx.transform(model, inputs, parametrization=..., base=...), then "
            "torch.compile(model) with the default backend."
        )
    if opts.pretrained:  # the backend captures per compile; importing weights needs one graph
        raise UmupError(
            "pretrained=True converts the weights once, through transform: call "
            "umup_fx.transform(model, inputs, pretrained=True), then torch.compile(model) with "
            "the default backend (docs/deploy.md, 'Pretrained in')."
        )
    return opts


def _options(example_inputs: list[Any], given: dict[str, Any]) -> tuple[Options, bool]:
    """The options in force, and whether this is the model's first compile (init due)."""
    if any(getattr(x, TRANSFORMED_ATTR, False) for x in example_inputs):
        raise UmupError(
            "This model was rewritten by umup_fx.transform already; backend='umup' would "
            "apply u-muP a second time. Compile it with the default backend: "
            "torch.compile(model)."
        )
    marked = [getattr(x, _OPTIONS_ATTR) for x in example_inputs
              if isinstance(x, nn.Parameter) and hasattr(x, _OPTIONS_ATTR)]
    if not marked:
        return _u_mup_only(Options.build(given.pop("hparams", None), **given)), True
    prepared = marked[0]
    if not given:
        return prepared, False
    fixed = sorted(set(given) - set(_GRAPH_ONLY))
    if fixed:
        raise UmupError(
            f"backend options {fixed} decide init and optimizer groups, which "
            "umup_fx.prepare already set: pass them to prepare. The backend takes only "
            f"{', '.join(_GRAPH_ONLY)} (and inner)."
        )
    asked = Options.build(given.get("hparams", prepared.hparams), fp8=given.get("fp8", prepared.fp8))
    return dataclasses.replace(prepared, hparams=asked.hparams, fp8=asked.fp8), False


def _first_compile(example_inputs: list[Any], captured: Any, plan: Plan, opts: Options) -> None:
    """No ``prepare``: unit-initialise the graph's parameters now, mark them so later
    recompiles keep their values, and give optimizers built earlier their LR factors."""
    tensors = {name: info.tensor for name, info in captured.params.items()}
    with torch.no_grad():
        for name, tensor in tensors.items():
            p = plan.params[name]
            if opts.reinit:
                if p.init == "normal":
                    tensor.normal_(0.0, 1.0)
                elif p.init == "zeros":
                    tensor.zero_()
                elif p.init == "ones":
                    tensor.fill_(1.0)
            setattr(tensor, _OPTIONS_ATTR, opts)
            resolve_pending_groups(tensor, p.lr_factor)


def _dump(name: str, before: fx.GraphModule, after: fx.GraphModule) -> None:
    directory = os.environ.get("UMUP_FX_DUMP")
    if not directory:
        return
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for tag, gm in (("before", before), ("after", after)):
        (out / f"{name}.{tag}.py").write_text(gm.code)
        try:
            from torch.fx.passes.graph_drawer import FxGraphDrawer

            FxGraphDrawer(gm, f"{name}_{tag}").get_dot_graph().write_svg(str(out / f"{name}.{tag}.svg"))
        except Exception:  # noqa: BLE001 - pictures need the optional pydot / graphviz
            pass


def _inner_compiler(inner: Any) -> Callable[..., Any]:
    if inner is None or inner == "inductor":
        from torch._inductor.compile_fx import compile_fx

        return compile_fx
    if isinstance(inner, str):
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend(inner)
    return inner


def _owner(params: list[torch.Tensor]) -> nn.Module | None:
    """The model being compiled: the outermost module on the calling stack that owns
    the graph's parameters (the backend runs inside the model's compiled call)."""
    wanted = {id(p) for p in params}
    found, frame = None, sys._getframe()
    while frame is not None:
        obj = frame.f_locals.get("self")
        if (isinstance(obj, nn.Module) and not hasattr(obj, "_orig_mod")
                and any(id(p) in wanted for p in obj.parameters())):
            found = obj
        frame = frame.f_back
    return found


def _per_shape(gm: fx.GraphModule, options: dict | None, sources: list[str | None]) -> Callable:
    """Compile ``gm`` once per concrete size, at the first call with that size. A graph
    Dynamo made dynamic (SymInt inputs, after a new batch or sequence size) cannot be
    exported as it is (this is what ``dynamic=False`` would do, without the flag); a
    graph at sizes other than the model's reference is exported with those sizes
    symbolic, which must not happen inside Dynamo's compile (its guards then fail)."""
    compiled: dict[tuple, Callable] = {}

    def run(*args: Any) -> Any:
        key = tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args)
        if key not in compiled:
            compiled[key] = umup_backend(gm, list(args), options, sources=sources)
        return compiled[key](*args)

    return run


def _off_reference(owner: nn.Module | None, inputs: list[Any], sources: list[str | None]) -> bool:
    """Whether ``inputs`` are at sizes other than the model's reference sizes."""
    reference = getattr(owner, REFERENCE_ATTR, None) if owner is not None else None
    if reference is None:
        return False
    resized = dynamo_inputs_at_reference(inputs, sources, owner, reference)
    return resized is not None and resized[1] is not None


def _takes(captured: Any, inputs: list[Any]) -> bool:
    """Whether a graph captured at the reference sizes still takes ``inputs``: every
    size in which they differ from the reference stayed symbolic in the export."""
    by_name = {n.name: n for n in captured.gm.graph.nodes if n.op == "placeholder"}
    specs = [s for s in captured.program.graph_signature.input_specs
             if s.kind == InputKind.USER_INPUT]
    for spec, x in zip(specs, inputs, strict=True):
        val = by_name[spec.arg.name].meta.get("val")
        if isinstance(x, torch.Tensor):
            sizes = zip(val.shape, x.shape, strict=True) if isinstance(val, torch.Tensor) else ()
            if any(isinstance(a, int) and a != b for a, b in sizes):
                return False
        elif isinstance(x, int) and isinstance(val, int) and val != x:
            return False
    return True


def _capture_at_reference(gm: fx.GraphModule, inputs: list[Any], sources: list[str | None],
                          owner: nn.Module | None, first: bool) -> Any:
    """Dynamo's graph captured so that every size a scale reads is the model's reference
    size (rules §3), the same for every compile: the inputs stand in at the reference
    sizes and the sizes that differ are exported symbolic. The first compile of a model
    sets the reference (unless ``prepare`` did). When the graph cannot take these sizes
    symbolically (``dynamic=False`` or ``torch._dynamo.reset()`` gave a graph with this
    call's sizes written in) or shares no input with the reference call (a graph after
    a graph break, recompiled), it is captured at its own sizes and says so
    (``ReferenceSizeWarning``)."""
    reference = getattr(owner, REFERENCE_ATTR, None) if owner is not None else None
    if reference is None:
        named = {} if owner is None or not first else {
            name: tuple(x.shape) for s, x in zip(sources, inputs, strict=True)
            if isinstance(x, torch.Tensor) and (name := dynamo_input_name(s, owner.forward))
        }
        if named:
            setattr(owner, REFERENCE_ATTR, named)
        return capture_dynamo_graph(gm, inputs, sources)
    resized = dynamo_inputs_at_reference(inputs, sources, owner, reference)
    if resized is not None and resized[1] is None:  # already the reference sizes
        return capture_dynamo_graph(gm, inputs, sources)
    if resized is not None:
        try:
            captured = capture_dynamo_graph(gm, resized[0], sources, resized[1])
            if _takes(captured, inputs):
                return captured
        except UmupError:
            pass  # then at its own sizes, with the warning below
    if resized is not None or not first:
        shapes = [tuple(x.shape) for x in inputs
                  if isinstance(x, torch.Tensor) and not isinstance(x, nn.Parameter)]
        why = ("its inputs share no argument with the reference call (a graph after a "
               "graph break), so its sizes are this call's" if resized is None else
               "Dynamo wrote this call's sizes into it (dynamic=False, or a first call "
               "after prepare or torch._dynamo.reset() at other sizes), so its gradient "
               "scales and a length-dependent attention scale are this call's. Mark the "
               "sizes dynamic before that call (torch._dynamo.mark_dynamic(x, [0, 1])) or "
               "make it at the reference sizes")
        warnings.warn(
            f"umup_fx: a graph of {type(owner).__name__} compiled by the umup backend for "
            f"inputs of shapes {shapes} could not be captured at the model's reference "
            f"sizes {sorted(reference.items())} (rules section 3): {why}; or transform "
            "the model (umup_fx.transform) and compile that.",
            ReferenceSizeWarning,
            stacklevel=2,
        )
    return capture_dynamo_graph(gm, inputs, sources)


def umup_backend(gm: fx.GraphModule, example_inputs: list[Any], options: dict | None = None,
                 *, sources: list[str | None] | None = None) -> Callable:
    """``torch.compile`` backend: re-capture, run the u-muP pipeline, hand to ``inner``.
    ``sources`` is given when ``_per_shape`` calls it, at run time."""
    owner = _owner([x for x in example_inputs if isinstance(x, nn.Parameter)])
    if sources is None:  # inside Dynamo's compile
        sources = dynamo_sources(gm)  # Dynamo forgets them once this backend returns
        if any(isinstance(x, torch.SymInt) for x in example_inputs) or _off_reference(
            owner, example_inputs, sources
        ):
            return _per_shape(gm, options, sources)
    given = dict(options or {})
    inner = _inner_compiler(given.pop("inner", None))
    opts, first = _options(example_inputs, given)
    captured = _capture_at_reference(gm, example_inputs, sources, owner, first)
    rewritten = captured.gm
    meta.graph_meta(rewritten)[meta.STATIC_MODE] = True
    before = fx.GraphModule(rewritten, rewritten.graph.__deepcopy__())
    plan = run_pipeline(rewritten, opts, captured.model_name)
    if first:
        _first_compile(example_inputs, captured, plan, opts)
        if owner is not None and "umup_plan" not in vars(owner):
            plan.model_name = type(owner).__name__
            owner.umup_plan = plan  # type: ignore[assignment]  # as prepare / transform
    compiled_plans.append(plan)
    _dump(f"umup_graph_{len(compiled_plans) - 1}", before, rewritten)
    specs = captured.program.graph_signature.input_specs
    state = {**captured.program.state_dict, **captured.program.constants}
    lifted = [state[s.target] for s in specs if s.kind != InputKind.USER_INPUT]
    try:
        compiled = inner(rewritten, [*lifted, *example_inputs])
    except Exception as exc:
        if not _floats_as_tensors(example_inputs):
            raise
        raise UmupError(
            f"The umup backend's inner compiler failed ({type(exc).__name__}) on a graph that "
            "takes 0-dim float tensors, which is how torch.compile(..., dynamic=True) passes "
            "the model's float attributes (a norm's eps): dynamic=True is not supported by "
            "backend='umup'. Leave dynamic unset (new batch and sequence sizes are handled, "
            "docs/compile.md), or transform the model and compile that."
        ) from exc
    return compiled if not lifted else lambda *args: compiled(*lifted, *args)


def _floats_as_tensors(inputs: list[Any]) -> bool:
    """Whether Dynamo passed Python floats as 0-dim tensors (``dynamic=True``)."""
    return any(isinstance(x, torch.Tensor) and not isinstance(x, nn.Parameter) and x.dim() == 0
               and x.is_floating_point() for x in inputs)


def register() -> None:
    """Register ``"umup"`` with ``torch.compile`` (done on ``import umup_fx``)."""
    from torch._dynamo.backends.registry import _COMPILER_FNS, register_backend

    if "umup" not in _COMPILER_FNS:
        register_backend(name="umup")(umup_backend)


