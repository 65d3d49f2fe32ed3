"""The whole pipeline on one screen: capture -> analyse -> plan -> rewrite.

``umup_fx.analyze`` runs the analysis passes; ``umup_fx.transform`` and the ``"umup"``
``torch.compile`` backend both call ``run_pipeline`` (analysis, then rewrite) on the
graph they captured, so the two entry points share every pass.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch import fx, nn

from umup_fx import meta, rules
from umup_fx.capture.trace import capture
from umup_fx.errors import AnalysisError, UmupError
from umup_fx.hparams import HParams
from umup_fx.options import Options
from umup_fx.passes._graph import op_name, where
from umup_fx.passes.coverage import find_uncovered
from umup_fx.passes.dims import infer_dims
from umup_fx.passes.fp8_eligible import mark_fp8
from umup_fx.passes.match import match_rules
from umup_fx.passes.model_scales import drop_model_scales, find_model_scales
from umup_fx.passes.moe import find_routing, scale_moe_combines
from umup_fx.passes.mup import mup_attention, mup_readouts
from umup_fx.passes.norms import find_norms
from umup_fx.passes.residuals import find_residuals
from umup_fx.passes.roles import assign_roles
from umup_fx.passes.scale_attention import scale_manual_attention, scale_sdpa, scale_softmax
from umup_fx.passes.scale_norms import scale_norms
from umup_fx.passes.scale_pointwise import (
    scale_activations,
    scale_cross_entropy,
    scale_dropout,
    scale_matmuls,
    scale_picks,
    scale_pooling,
    scale_readout_outputs,
)
from umup_fx.passes.scale_residuals import scale_residuals
from umup_fx.passes.scale_weights import (
    scale_convs,
    scale_direct_params,
    scale_embeddings,
    scale_linears,
)
from umup_fx.passes.shard_sizes import free_shard_sizes
from umup_fx.passes.weight_norm import find_weight_norms, scale_weight_norms
from umup_fx.plan import Plan, build_plan, expand_blocks


def analysis_passes(roles: dict[str, str] | None = None) -> list[Callable[[fx.GraphModule], Any]]:
    """The analysis passes, in the order they must run (each reads its predecessors)."""
    return [
        infer_dims,  # umup.dims: sympy dims, fixed vs width (rules §1)
        find_norms,  # umup.norm: normalisation outputs and gains
        find_weight_norms,  # umup.weight_norm: g * v / ||v||, v read as the weight
        match_rules,  # umup.rule: which §3 rule each op gets
        functools.partial(assign_roles, overrides=roles),  # roles and fans (§1)
        find_routing,  # MoE routers, gates and the gated combine (§10)
        find_model_scales,  # a model's own sqrt(d) / d^-1/2 where u-muP sets the scale
        find_residuals,  # residual branches, depth, tau (§4)
        mark_fp8,  # umup.fp8: non-critical matmuls (§7)
        find_uncovered,  # ops no rule covers, listed
    ]


def rewrite_passes(parametrization: str = "umup") -> list[Callable[[fx.GraphModule], Any]]:
    """The rewrite passes; each swaps the ops of one concern for ``umup_fx.runtime.ops`` calls.

    They read the plan (``gm.meta["umup"]["plan"]``) and node metadata only, and rewrite
    nodes in place, keeping node names and metadata for the passes after them. The μP
    baseline has its own two (``passes/mup.py``); SP rewrites nothing.
    """
    if parametrization == "mup":
        return [mup_readouts, mup_attention]
    if parametrization != "umup":
        return []
    return [
        drop_model_scales,  # before the weight ops: they read their inputs
        scale_residuals,  # residual split / add with tau, plain adds (§3, §4)
        scale_linears,  # linears by role; FP8 on eligible ones (§3, §7)
        scale_convs,  # the linear rule, fan_in = C_in/groups * kernel
        scale_weight_norms,  # weight norm's result at unit scale, g a gain
        scale_embeddings,
        scale_direct_params,  # position tables / cls tokens used as values
        scale_norms,  # non-parametric norms by default (§2)
        scale_sdpa,  # SDPA with alpha/d_head logits (§3)
        scale_manual_attention,  # hand-written attention gets SDPA's rule
        scale_softmax,
        scale_moe_combines,  # experts x gates: 1 / (g0 sqrt(k)) (§10)
        scale_activations,  # SiLU, GELU, gated units
        scale_dropout,
        scale_pooling,
        scale_picks,
        scale_matmuls,
        scale_cross_entropy,  # the loss's backward: mean x reference rows (§3)
        scale_readout_outputs,  # logits returned for a loss outside the model (§3)
        free_shard_sizes,  # reshapes keep a shard's head count (tensor parallel)
    ]


def run_pass(run: Callable[[fx.GraphModule], Any], gm: fx.GraphModule, model_name: str) -> None:
    """Run one pass; anything but an ``UmupError`` becomes an ``AnalysisError`` that names
    the pass and the model (the chained exception keeps the traceback for a report)."""
    try:
        run(gm)
    except UmupError:
        raise
    except Exception as exc:  # noqa: BLE001 - a raw crash is never what a user sees
        name = getattr(run, "__name__", None) or getattr(getattr(run, "func", None), "__name__", "a")
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        node = _failing_node(exc)
        at = f" on {op_name(node)} at {where(node)}" if node is not None else ""
        raise AnalysisError(
            f"umup_fx could not process {model_name}: its {name} pass failed{at} with "
            f"{type(exc).__name__}: {first[:300]}. This is an op or pattern umup_fx does not "
            "handle yet; roles={...} cannot fix it. Please report it with the model "
            "(UMUP_FX_DEBUG=1 shows where it failed)."
        ) from exc


def _failing_node(exc: BaseException) -> fx.Node | None:
    """The graph node the innermost pass frame was working on (a local ``node`` / ``n``)."""
    found, tb = None, exc.__traceback__
    while tb is not None:
        local = tb.tb_frame.f_locals
        candidate = local.get("node", local.get("n"))
        if isinstance(candidate, fx.Node) and candidate.op == "call_function":
            found = candidate
        tb = tb.tb_next
    return found


def plan_graph(gm: fx.GraphModule, options: Options, model_name: str = "model") -> Plan:
    """Analyse ``gm`` and settle the plan under ``options`` (FP8 mode, frozen norms)."""
    plan = analyze_graph(gm, options.hparams, options.roles, model_name)
    plan.fp8_mode = options.fp8
    if not options.trainable_norms and options.parametrization == "umup":
        for p in plan.params.values():
            if p.role == rules.NORM:
                p.trainable, p.frozen_by_umup = False, True
    return plan


def rewrite_graph(gm: fx.GraphModule, plan: Plan, options: Options) -> None:
    """Rewrite an analysed ``gm`` in place into its u-muP form, from ``plan``."""
    g = meta.graph_meta(gm)
    g[meta.PLAN], g[meta.OPTIONS] = plan, options
    for rewrite in rewrite_passes(plan.parametrization):
        run_pass(rewrite, gm, plan.model_name)
    gm.graph.lint()
    gm.recompile()
    plan.uncovered = list(g[meta.UNCOVERED])


def run_pipeline(gm: fx.GraphModule, options: Options, model_name: str = "model") -> Plan:
    """Analyse ``gm``, then rewrite it in place into its u-muP form; returns the plan."""
    plan = plan_graph(gm, options, model_name)
    rewrite_graph(gm, plan, options)
    return plan


def analyze_graph(
    gm: fx.GraphModule,
    hparams: HParams | None = None,
    roles: dict[str, str] | None = None,
    model_name: str = "model",
) -> Plan:
    """Run every analysis pass over a captured graph and collect the plan."""
    meta.graph_meta(gm)[meta.HPARAMS] = HParams.coerce(hparams)
    for analysis in analysis_passes(roles):
        run_pass(analysis, gm, model_name)
    return build_plan(gm, model_name)


def analyze(
    model: nn.Module,
    example_inputs: Any,
    example_kwargs: dict[str, Any] | None = None,
    *,
    hparams: HParams | dict[str, float] | None = None,
    roles: dict[str, str] | None = None,
    trainable_norms: bool = False,
    fp8: bool | str = False,
) -> Plan:
    """Decide what u-muP does with ``model`` without changing it: the plan that
    ``transform`` with the same options would apply (norm gains frozen by default).

    Args:
        model: an unmodified ``nn.Module``.
        example_inputs: positional arguments of one forward call (a tuple, or a tensor).
        example_kwargs: keyword arguments of that call.
        hparams: the u-muP multipliers (``HParams`` or a dict); defaults all 1.
        roles: override the role of named parameters (``{"pos.weight": "input"}``).
        trainable_norms, fp8: as ``transform``'s options of those names.

    Returns:
        The ``Plan``; ``print(plan)`` shows the table.
    """
    opts = Options.build(hparams, roles=roles, trainable_norms=trainable_norms, fp8=fp8)
    captured = capture(model, example_inputs, example_kwargs)
    plan = plan_graph(captured.gm, opts, type(model).__name__)
    expand_blocks(plan, captured.gm, captured.blocks)
    return plan


def explain(
    model_or_plan: nn.Module | Plan,
    example_inputs: Any = None,
    example_kwargs: dict[str, Any] | None = None,
    **options: Any,
) -> str:
    """The readable report for a plan, or for a model (analysed on the spot)."""
    if isinstance(model_or_plan, Plan):
        return str(model_or_plan)
    plan = getattr(model_or_plan, "umup_plan", None)
    if isinstance(plan, Plan):
        return str(plan)
    if example_inputs is None:
        raise UmupError(
            f"{type(model_or_plan).__name__} has no u-muP plan yet: give example inputs "
            "(explain(model, example_inputs) analyses it), or, for a model compiled with "
            "backend='umup', explain it after its first compiled call (or "
            "umup_fx.prepare(model, example_inputs) before compiling)."
        )
    return str(analyze(model_or_plan, example_inputs, example_kwargs, **options))
