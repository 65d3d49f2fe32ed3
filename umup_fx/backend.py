"""The ``"umup"`` ``torch.compile`` backend: the same passes as ``transform``, then Inductor.

    model = umup_fx.prepare(model, example_inputs)        # unit init + plan, in place
    opt = umup_fx.AdamW(model, lr=2**-3)                   # groups from that plan
    compiled = torch.compile(model, backend="umup")        # rewrite at first call

Why ``prepare`` comes first: a backend runs at the first call, after the optimizer
exists and after weights were initialised, and sees only one graph (a graph break
gives it pieces). Unit init and the LR groups are model-wide facts, so they come
from ``prepare``, which runs the analysis on the whole model; the backend checks that
it ran and reuses its options. ``torch.compile(umup_fx.transform(model, ...))`` with
the default backend is the other, equivalent route.

Options (``torch.compile(..., options={...})``): ``hparams`` and ``fp8`` (as
``transform``; they override ``prepare``'s, since they change only the graph), and
``inner`` (a compiler callable or backend name; Inductor by default). ``roles`` and
``trainable_norms`` decide init and LR groups, so they go to ``prepare`` only. Set
``UMUP_FX_DUMP=<dir>`` to write every graph before and after the rewrite (``.py``
code, and ``.svg`` if pydot is installed).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import fx, nn
from torch.export.graph_signature import InputKind

from . import meta
from .capture import capture, capture_dynamo_graph
from .errors import UmupError
from .init import initialise
from .options import Options
from .pipeline import plan_graph, run_pipeline
from .plan import Plan, expand_blocks

_OPTIONS_ATTR = "_umup_options"
compiled_plans: list[Plan] = []  # every graph the backend rewrote, in order (inspection)


def prepare(model: nn.Module, example_inputs: Any, example_kwargs: dict | None = None,
            *, hparams: Any = None, **options: Any) -> nn.Module:
    """Ready ``model`` for ``torch.compile(model, backend="umup")``, in place.

    Runs the analysis, re-initialises weights to unit scale, freezes non-parametric
    norm gains, and attaches the plan (``model.umup_plan``) so ``umup_fx.AdamW`` /
    ``param_groups`` work before the first compiled call. Returns ``model``.
    """
    opts = Options.build(hparams, **options)
    captured = capture(model, example_inputs, example_kwargs)
    plan = plan_graph(captured.gm, opts, captured.model_name)
    expand_blocks(plan, captured.gm, captured.blocks)
    initialise(model, plan, opts.reinit)
    for p in model.parameters():
        setattr(p, _OPTIONS_ATTR, opts)
    model.umup_plan = plan  # type: ignore[assignment]
    return model


# Options that only change the rewritten graph; the others (roles, trainable_norms,
# reinit) decide init, frozen parameters and LR groups, which prepare() already fixed.
_GRAPH_ONLY = ("hparams", "fp8")


def _options(example_inputs: list[Any], given: dict[str, Any]) -> Options:
    marked = [getattr(x, _OPTIONS_ATTR) for x in example_inputs
              if isinstance(x, nn.Parameter) and hasattr(x, _OPTIONS_ATTR)]
    if not marked:
        raise UmupError(
            "torch.compile(model, backend='umup') needs umup_fx.prepare(model, example_inputs) "
            "first: it re-initialises the weights to unit scale and gives umup_fx.AdamW the "
            "u-muP plan, which a backend (running at the first call) cannot do. Or use "
            "torch.compile(umup_fx.transform(model, example_inputs))."
        )
    prepared = marked[0]
    if not given:
        return prepared
    fixed = sorted(set(given) - set(_GRAPH_ONLY))
    if fixed:
        raise UmupError(
            f"backend options {fixed} decide init and optimizer groups, which "
            "umup_fx.prepare already set: pass them to prepare. The backend takes only "
            f"{', '.join(_GRAPH_ONLY)} (and inner)."
        )
    asked = Options.build(given.get("hparams", prepared.hparams), fp8=given.get("fp8", prepared.fp8))
    return dataclasses.replace(prepared, hparams=asked.hparams, fp8=asked.fp8)


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


def umup_backend(gm: fx.GraphModule, example_inputs: list[Any], options: dict | None = None) -> Callable:
    """``torch.compile`` backend: re-capture, run the u-muP pipeline, hand to ``inner``."""
    given = dict(options or {})
    inner = _inner_compiler(given.pop("inner", None))
    opts = _options(example_inputs, given)
    captured = capture_dynamo_graph(gm, example_inputs)
    rewritten = captured.gm
    meta.graph_meta(rewritten)[meta.STATIC_MODE] = True
    before = fx.GraphModule(rewritten, rewritten.graph.__deepcopy__())
    plan = run_pipeline(rewritten, opts, captured.model_name)
    compiled_plans.append(plan)
    _dump(f"umup_graph_{len(compiled_plans) - 1}", before, rewritten)
    specs = captured.program.graph_signature.input_specs
    if all(s.kind == InputKind.USER_INPUT for s in specs):
        return inner(rewritten, list(example_inputs))
    state = {**captured.program.state_dict, **captured.program.constants}
    lifted = [state[s.target] for s in specs if s.kind != InputKind.USER_INPUT]
    compiled = inner(rewritten, [*lifted, *example_inputs])
    return lambda *args: compiled(*lifted, *args)


def register() -> None:
    """Register ``"umup"`` with ``torch.compile`` (done on ``import umup_fx``)."""
    from torch._dynamo.backends.registry import _COMPILER_FNS, register_backend

    if "umup" not in _COMPILER_FNS:
        register_backend(name="umup")(umup_backend)


