"""``umup_fx.transform``: an unmodified model in, the same model rewritten to u-muP.

One pipeline: capture (a prefix of each block list, on the model's meta shadow),
analyse into one plan, extend the plan to every block, rewrite the graph from it,
cut it into the root's graph and one graph per distinct block, install them on the
model's own modules (``umup_fx.runtime.modules``), initialise to unit scale.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from umup_fx import parametrizations
from umup_fx.capture import blocks as discovery
from umup_fx.capture.trace import Captured, capture
from umup_fx.diagnose import unit_check
from umup_fx.errors import AlreadyTransformedError
from umup_fx.options import Options
from umup_fx.passes.cut_regions import RegionError, split_regions, unroll_calls
from umup_fx.passes.placement import generalize_placement
from umup_fx.pipeline import plan_graph, rewrite_graph
from umup_fx.plan import expand_blocks
from umup_fx.runtime.init import initialise
from umup_fx.runtime.modules import (
    TENSOR,
    RegionGraph,
    UmupModule,
    install_block,
    install_root,
    is_transformed,
)

__all__ = ["OneGraphWarning", "PostNormWarning", "UmupModule", "UncoveredOpWarning", "transform"]


TRANSFORMED_ATTR = "_umup_transformed"


class UncoveredOpWarning(UserWarning):
    """An op on the activation path that no u-muP rule covers runs unscaled."""


class PostNormWarning(UserWarning):
    """The model's residual adds feed a norm (post-LN); u-muP's residual rule assumes pre-norm."""


class OneGraphWarning(UserWarning):
    """The model runs as one graph: its blocks could not be kept as modules of their own."""


def check_fresh(model: nn.Module) -> None:
    """Raise unless ``model`` is untouched by umup_fx (not transformed, not prepared)."""
    for name, module in model.named_modules():
        if is_transformed(module) or getattr(module, "umup_plan", None) is not None:
            where = f"its submodule {name!r}" if name else "it"
            how = "transformed" if is_transformed(module) else "prepared (umup_fx.prepare)"
            raise AlreadyTransformedError(
                f"{type(model).__name__} cannot be transformed: {where} was already "
                f"{how} by umup_fx (and its weights re-initialised). Transform a fresh "
                "model once; to change hparams or options, build the model again."
            )


def _fingerprint(rg: RegionGraph) -> tuple:
    """The graph's computation with node names abstracted (equal graphs, equal prints)."""
    index = {n: i for i, n in enumerate(rg.gm.graph.nodes)}

    def norm(a: Any) -> Any:
        return ("%", index[a]) if isinstance(a, fx.Node) else repr(a)

    return tuple(rg.inputs), tuple(
        (
            n.op,
            "" if n.op == "placeholder" else str(n.target),  # inputs are told by rg.inputs
            fx.node.map_aggregate(n.args, norm),
            fx.node.map_aggregate(n.kwargs, norm),
        )
        for n in rg.gm.graph.nodes
    )


def _example_leaves(args: Any, kwargs: dict | None) -> list[Any]:
    args = (args,) if isinstance(args, torch.Tensor) else tuple(args)
    flat = pytree.tree_leaves((args, dict(kwargs or {})))
    return [TENSOR if isinstance(x, torch.Tensor) else x for x in flat]


def _build(captured: Captured, opts: Options, leaves: list[Any]) -> tuple:
    gm = captured.gm
    original = fx.GraphModule(gm, gm.graph.__deepcopy__())
    plan = plan_graph(gm, opts, captured.model_name)
    taus = expand_blocks(plan, gm, captured.blocks)
    parametrizations.apply(plan, opts.parametrization, opts.base, opts.sigma_init)
    rewrite_graph(gm, plan, opts)
    kept = [b.block_path(i) for b in captured.blocks for i in range(b.kept)]
    split = split_regions(gm, captured.program, kept, leaves, captured.model_name)
    graphs: dict[str, RegionGraph] = {}  # every block path -> its (shared) graph
    for b in captured.blocks:
        by_print: dict[tuple, RegionGraph] = {}
        for i in range(b.kept):
            rg = split.blocks[b.block_path(i)]
            graphs[b.block_path(i)] = by_print.setdefault(_fingerprint(rg), rg)
        for i in range(b.kept, len(b.names)):
            template = b.block_path(b.template[i])
            twins = [b.block_path(j) for j in range(b.kept) if b.keys[j] == b.keys[i]]
            if len({id(graphs[t]) for t in twins}) > 1:
                raise RegionError(f"blocks {twins} look alike but rewrite differently")
            graphs[b.block_path(i)] = graphs[template]
        unroll_calls(split, [b.block_path(i) for i in range(len(b.names))])
    split.root.gm.graph.lint()
    split.root.gm.recompile()
    for rg in [split.root, *{id(g): g for g in graphs.values()}.values()]:
        generalize_placement(rg)
    return plan, taus, graphs, split.root, original


def _install(model: nn.Module, captured: Captured, built: tuple) -> None:
    plan, taus, graphs, root, original = built
    for b in captured.blocks:
        container = model.get_submodule(discovery.live_path(model, b.path))
        for k, name in enumerate(b.names):
            path = b.block_path(k)
            install_block(container._modules[name], graphs[path], taus.get(path, []))
    install_root(model, root, plan, original)


def _as_written(model: nn.Module, args: Any, kwargs: dict | None, opts: Options) -> nn.Module:
    """SP baselines: the model runs as written; the analysis only sets its LR groups."""
    captured = capture(model, args, kwargs)
    plan = plan_graph(captured.gm, opts, captured.model_name)
    expand_blocks(plan, captured.gm, captured.blocks)
    parametrizations.apply(plan, opts.parametrization, opts.base, opts.sigma_init)
    model.umup_plan = plan
    for p in model.parameters():
        setattr(p, TRANSFORMED_ATTR, True)
    return model


def transform(
    model: nn.Module,
    example_inputs: Any,
    example_kwargs: dict[str, Any] | None = None,
    *,
    hparams: Any = None,
    **options: Any,
) -> nn.Module:
    """Rewrite ``model`` into u-muP in place: scaled ops, unit init, non-parametric norms.

    The model keeps its class (a subclass of it), module tree, names and parameters;
    each block of its layer list runs its own rewritten graph, so per-block
    ``fully_shard``, activation checkpointing and ``torch.compile`` apply as usual.
    A model on ``meta`` is transformed without touching weights (``umup_fx.init_``
    after ``to_empty``). Device and dtype are read from the weights at run time.

    Args:
        model: an unmodified ``nn.Module``.
        example_inputs: positional arguments of one forward call (tuple or tensor). The
            model then accepts calls of the same structure; batch and sequence sizes
            may vary.
        example_kwargs: keyword arguments of that call.
        hparams: ``HParams`` or a dict of its fields (all default 1).
        **options: ``roles``, ``trainable_norms``, ``reinit``, ``fp8``, and for a
            baseline ``parametrization`` ("mup", "sp", "sp_emb_lr"; default "umup"),
            ``base`` (the same model at the base width) and ``sigma_init`` (see
            ``Options`` and ``umup_fx.parametrizations``).

    Returns:
        ``model`` itself; train it with ``umup_fx.AdamW(model, lr=...)``.

    Raises:
        AlreadyTransformedError: ``model`` (or a submodule) was transformed before.
        CaptureError / AnalysisError: the model cannot be captured or analysed.
    """
    check_fresh(model)
    if isinstance(options.get("base"), nn.Module):  # baselines: analyse the base model too
        options["base"] = parametrizations.base_shapes(
            options["base"], example_inputs, example_kwargs)
    opts = Options.build(hparams, **options)
    if opts.parametrization in ("sp", "sp_emb_lr"):
        return _as_written(model, example_inputs, example_kwargs, opts)
    leaves = _example_leaves(example_inputs, example_kwargs)
    captured = capture(model, example_inputs, example_kwargs)
    try:
        built = _build(captured, opts, leaves)
    except RegionError as first:
        if any(b.kept < len(b.names) for b in captured.blocks):
            captured = capture(model, example_inputs, example_kwargs, full=True)
            try:
                built = _build(captured, opts, leaves)
            except RegionError:
                built = None
        else:
            built = None
        if built is None:
            warnings.warn(
                f"umup_fx: {captured.model_name} runs as one graph ({first}); its blocks "
                "are not separate modules, so per-block fully_shard, activation "
                "checkpointing and compile do not apply.",
                OneGraphWarning,
                stacklevel=2,
            )
            captured = capture(model, example_inputs, example_kwargs, blocks=False)
            built = _build(captured, opts, leaves)
    plan = built[0]
    if plan.uncovered and opts.parametrization == "umup":
        listed = "; ".join(f"{op} at {src}" for _, op, src in plan.uncovered)
        warnings.warn(
            f"umup_fx: {len(plan.uncovered)} op(s) of {captured.model_name} have no u-muP rule "
            f"and run unscaled: {listed}. The report (umup_fx.explain) lists them.",
            UncoveredOpWarning,
            stacklevel=2,
        )
    post = [b for b in plan.branches if b.post_norm]
    if post and opts.parametrization == "umup":
        warnings.warn(
            f"umup_fx: {captured.model_name} is post-norm ({len(post)} residual adds feed a "
            "norm, e.g. at the branch ending in parameter "
            f"{post[0].params[-1] if post[0].params else post[0].add!r}). u-muP's residual "
            "rule assumes pre-norm: width transfer holds, depth transfer is not promised "
            "(docs/rules.md section 4).",
            PostNormWarning,
            stacklevel=2,
        )
    _install(model, captured, built)
    initialise(model, plan, opts.reinit)
    for p in model.parameters():
        setattr(p, TRANSFORMED_ATTR, True)  # the "umup" backend must not rewrite it again
    if opts.check and opts.parametrization == "umup" and opts.reinit and unit_check.cheap(model):
        unit_check.warn_if_off(model, example_inputs, example_kwargs)  # rules §8
    return model
