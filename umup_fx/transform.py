"""``umup_fx.transform``: an unmodified model in, the same model rewritten to u-muP.

One pipeline: capture (a prefix of each block list, on the model's meta shadow),
analyse into one plan, extend the plan to every block, rewrite the graph from it,
cut it into the root's graph and one graph per distinct block, install them on the
model's own modules (``umup_fx.runtime.modules``), initialise to unit scale.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from umup_fx import parametrizations
from umup_fx.capture import blocks as discovery
from umup_fx.capture.reference import at_reference_sizes, reference_shapes
from umup_fx.capture.trace import Captured, capture
from umup_fx.diagnose import unit_check
from umup_fx.errors import AlreadyTransformedError, CallError, CaptureError, UmupError
from umup_fx.export import check_importable, import_pretrained
from umup_fx.hf_save import UmupPretrainedModel, is_hf_model
from umup_fx.options import Options
from umup_fx.passes.cut_regions import RegionError, Split, split_regions, unroll_calls
from umup_fx.passes.model_scales import model_scale_constants
from umup_fx.passes.placement import generalize_placement
from umup_fx.pipeline import plan_graph, rewrite_graph
from umup_fx.plan import expand_blocks
from umup_fx.runtime import saved_state
from umup_fx.runtime.adapters import guard_tree, refuse_adapters
from umup_fx.runtime.init import initialise
from umup_fx.runtime.modules import (
    TENSOR,
    RegionGraph,
    UmupModule,
    add_graph,
    as_written,
    call_key,
    install_block,
    install_root,
    install_submodule,
    is_transformed,
    own_error,
)
from umup_fx.runtime.names import canonical_name, unwrap
from umup_fx.runtime.optim import install_step_check

__all__ = ["CheckpointWarning", "InlinedCallWarning", "OneGraphWarning", "PostNormWarning", "ReferenceSizeWarning",
           "UmupModule",
           "UncoveredOpWarning", "transform"]


TRANSFORMED_ATTR = "_umup_transformed"


class UncoveredOpWarning(UserWarning):
    """An op on the activation path that no u-muP rule covers runs unscaled."""


class PostNormWarning(UserWarning):
    """The model's residual adds feed a norm (post-LN); u-muP's residual rule assumes pre-norm."""


class OneGraphWarning(UserWarning):
    """The model runs as one graph: its blocks could not be kept as modules of their own."""


class InlinedCallWarning(UserWarning):
    """A submodule with weights is not called as a module after transform: the rewrite
    fused its ops with its caller's, so hooks on it do not fire and it cannot be an
    FSDP2 or tensor-parallel unit of its own."""


class CheckpointWarning(UserWarning):
    """A ``torch.utils.checkpoint`` call in the model's forward is not kept (its
    activations are saved): only whole blocks checkpointed by their caller are."""


class ReferenceSizeWarning(UserWarning):
    """A call structure first seen after ``transform`` (or a graph the ``"umup"`` backend
    compiled after the first) was captured at its own sizes, not the model's reference
    sizes (rules §3): its gradient scales may differ."""


def _warn_unkept_checkpoints(captured: Captured) -> None:
    blocks = {b.block_path(i) for b in captured.blocks for i in range(len(b.names))}
    unkept = captured.other_checkpoints + sorted(set(captured.checkpointed) - blocks)
    if unkept:
        warnings.warn(
            f"umup_fx: {captured.model_name}'s forward calls torch.utils.checkpoint on "
            f"{', '.join(unkept)}; the rewritten graph keeps checkpoints of whole blocks "
            "only, so these activations are saved (more memory, same numbers). Checkpoint "
            "the transformed model's blocks instead: checkpoint(block, x) in the parent's "
            "loop, or torch's checkpoint_wrapper / apply_activation_checkpointing.",
            CheckpointWarning,
            stacklevel=3,
        )


def check_fresh(model: nn.Module, pretrained: bool = False) -> None:
    """Raise unless ``model`` is untouched by umup_fx (not transformed, not prepared)
    and holds no LoRA / PEFT adapters but the supported kind under ``pretrained=True``
    (``runtime/adapters.py``)."""
    refuse_adapters(model, pretrained)
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
    scales = model_scale_constants(gm)  # before the rewrite drops them
    taus = expand_blocks(plan, gm, captured.blocks)
    parametrizations.apply(plan, opts.parametrization, opts.base, opts.sigma_init)
    rewrite_graph(gm, plan, opts)
    kept = [b.block_path(i) for b in captured.blocks for i in range(b.kept)]
    split = split_regions(gm, captured.program, kept, captured.modules, leaves,
                          captured.model_name,
                          {p: o for p, o in captured.checkpointed.items() if p in kept})
    graphs = _every_module_graph(split, captured.blocks)
    inlined = dict(split.inlined)
    for b in captured.blocks:  # blocks past the prefix inline what their template inlines
        for i in range(b.kept, len(b.names)):
            template = b.block_path(b.template[i])
            for path, why in split.inlined.items():
                suffix = _inside(path, template)
                if suffix:
                    inlined[b.block_path(i) + suffix] = why
    for rg in [split.root, *{id(g): g for g in graphs.values()}.values()]:
        rg.gm.graph.lint()
        rg.gm.recompile()
        generalize_placement(rg)
    return plan, taus, graphs, split.root, original, scales, inlined


def _inside(path: str, block: str) -> str | None:
    """``path``'s suffix under ``block`` ("" for the block itself), or None."""
    if path == block:
        return ""
    return path[len(block):] if path.startswith(block + ".") else None


def _every_module_graph(split: Split, blocks: list) -> dict[str, RegionGraph]:
    """The graph of every module call kept, by module path, for the whole model: kept
    blocks of one structure share their graphs (and so their submodules'), and every block
    past the captured prefix runs its template's, submodules included; the calls to the
    kept blocks are unrolled to every block."""
    graphs = dict(split.regions)
    for b in blocks:
        shared: dict[tuple, RegionGraph] = {}
        for i in range(b.kept):
            block = b.block_path(i)
            for path, rg in split.regions.items():
                suffix = _inside(path, block)
                if suffix is not None:
                    graphs[path] = shared.setdefault((suffix, _fingerprint(rg)), rg)
        for i in range(b.kept, len(b.names)):
            template = b.block_path(b.template[i])
            twins = [b.block_path(j) for j in range(b.kept) if b.keys[j] == b.keys[i]]
            if len({id(graphs[t]) for t in twins}) > 1:
                raise RegionError(f"blocks {twins} look alike but rewrite differently")
            for path in split.regions:
                suffix = _inside(path, template)
                if suffix is not None:
                    graphs[b.block_path(i) + suffix] = graphs[path]
        unroll_calls(split, [b.block_path(i) for i in range(len(b.names))])
    return graphs


def _settings(opts: Options, reference: dict[str, tuple]) -> dict[str, Any]:
    """How the model was transformed, as its checkpoints carry it (runtime/saved_state.py):
    what its graphs' scales depend on, and FP8 (numerics only: not checked on load)."""
    found = {"umup_fx": saved_state.VERSION,
             "reference": {k: list(v) for k, v in sorted(reference.items())},
             "hparams": dataclasses.asdict(opts.hparams), "parametrization": opts.parametrization,
             "trainable_norms": opts.trainable_norms, "pretrained": opts.pretrained,
             "roles": dict(sorted(opts.roles.items())) if opts.roles else None, "fp8": opts.fp8}
    if opts.parametrization != "umup":
        found["sigma_init"] = opts.sigma_init
    return found


def _install(model: nn.Module, captured: Captured, built: tuple, recapture: Any,
             settings: dict[str, Any]) -> None:
    plan, taus, graphs, root, original, _, inlined = built
    by_path = _modules_by_path(model)
    blocks = {b.block_path(k) for b in captured.blocks for k in range(len(b.names))}
    for path, rg in graphs.items():
        if path in blocks:
            install_block(by_path[path], rg, taus.get(path, []))
        else:
            install_submodule(by_path[path], rg)
            block = max((b for b in blocks if path.startswith(b + ".")), key=len, default=None)
            if block is not None:  # it may hold some of its block's residual ops
                by_path[path].__dict__["_umup_taus"] = list(taus.get(block, []))
    install_root(model, root, plan, original, recapture, settings,
                 UmupPretrainedModel if is_hf_model(model) else UmupModule, inlined)


def _modules_by_path(model: nn.Module) -> dict[str, nn.Module]:
    """Every module by its canonical path; the module a wrapper holds, not the wrapper."""
    return {canonical_name(name): unwrap(m) for name, m in model.named_modules()}


def _capture_build(model: nn.Module, args: Any, kwargs: dict | None, opts: Options,
                   modes: tuple[str, ...]) -> tuple[Captured, tuple, str, RegionError | None]:
    """Capture and build with the first of ``modes`` that cuts: "prefix" (a prefix of
    each block list, unrolled), "full" (every block), "one" (no blocks: one graph)."""
    leaves = _example_leaves(args, kwargs)
    first: RegionError | None = None
    captured: Captured | None = None
    for mode in modes:
        if mode == "full" and captured and all(b.kept == len(b.names) for b in captured.blocks):
            continue  # the prefix held every block already
        try:
            captured = capture(model, args, kwargs, blocks=mode != "one", full=mode == "full")
        except CaptureError:
            if mode != "prefix" or "full" not in modes:
                raise
            continue  # a forward that indexes its blocks (self.layers[2]) needs them all
        try:
            return captured, _build(captured, opts, leaves), mode, first
        except RegionError as exc:
            first = first or exc
    assert first is not None
    raise first


_PARAM_FACTS = ("role", "lr_factor", "init", "init_std", "trainable", "frozen_by_umup")


def _reference_of(model: nn.Module, example_inputs: Any, example_kwargs: dict | None) -> dict:
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    return reference_shapes(model.forward, args, dict(example_kwargs or {}))


def _add_call_structure(model: nn.Module, args: tuple, kwargs: dict, *, opts: Options,
                        mode: str, reference: dict | None = None) -> None:
    """The first call of a structure the model has no graph for: capture it on the
    model's own code, analyse and rewrite it with the same passes and options, and
    add its root graph (and the block graphs of block calls not seen before) to the
    model's modules. The installed plan stays the model's plan: the new analysis must
    agree with it on every parameter (role, LR, init) and every block's taus, else
    this is a ``CallError``; weights, init and optimizer groups are not touched."""
    what = _describe_call(args, kwargs)
    _refuse_inference_state(model, what, args, kwargs)
    if any(type(p).__name__ == "DTensor" for p in model.parameters()):
        raise CallError(
            f"{type(model).__name__} got a call structure it has no graph for ({what}) after "
            "its weights were sharded (fully_shard / tensor parallel): a new structure is "
            "captured on the unsharded model. Call the model once with this structure "
            "before sharding, or call it as at transform."
        )
    modes = {"prefix": ("prefix", "full"), "full": ("full",), "one": ("one",)}[mode]
    # Captured at the transform's reference sizes (capture.reference), so this graph's
    # scales are the model's; if that call cannot be captured, at the call's own sizes.
    resized = at_reference_sizes(model.forward, reference or {}, args, kwargs)
    try:
        with as_written(model):
            found = None
            if resized is not None:
                with contextlib.suppress(UmupError):  # then at the call's own sizes
                    found = _capture_build(model, *resized, opts, modes)
            if found is None:
                found = _capture_build(model, args, kwargs, opts, modes)
                if reference:
                    warnings.warn(
                        f"umup_fx: the call of {type(model).__name__} with {what} could not "
                        "be captured at the transform's example sizes; its graph's reference "
                        "sizes (rules section 3) are this call's, so its gradient scales may "
                        "differ from the transform's call. Transform with this call's "
                        "structure as the example to avoid it.",
                        ReferenceSizeWarning,
                        stacklevel=4,
                    )
            captured, built, _, _ = found
    except UmupError as exc:
        own = own_error(model, args, kwargs)
        if own is not None:  # the call is wrong (1-D input_ids, float labels): its error
            raise own from None
        name = type(model).__name__
        raise CallError(
            f"{name} as written runs this call ({what}), but no graph could be captured "
            f"for it: {exc}\nA call's graph is traced for the shapes and dtypes of its "
            "tensors, not their values, so a call the model takes only for some values "
            "cannot have one (transformers models drop an attention_mask of all ones "
            "whatever its shape). Pass tensors whose sizes agree with each other (an "
            "attention_mask of input_ids' shape), or call the model as at transform."
        ) from exc
    _warn_unkept_checkpoints(captured)
    plan, taus, graphs, root, _, scales, _ = built
    _refuse_ignored_arguments(model, args, kwargs, scales, what)
    installed = model.umup_plan
    for name, p in plan.params.items():
        q = installed.params.get(name)
        differ = [f for f in _PARAM_FACTS if q is None or getattr(p, f) != getattr(q, f)]
        if differ:
            raise CallError(
                f"{type(model).__name__} called with {what}: this call analyses parameter "
                f"{name!r} differently from the transform's call ({', '.join(differ)}), so "
                "its graph cannot share the model's weights and optimizer groups. Transform "
                "with this call's structure as the example."
            )
    by_path = _modules_by_path(model)
    for b in captured.blocks:
        for k in range(len(b.names)):
            path = b.block_path(k)
            if [round(t, 12) for t in taus.get(path, [])] != [
                    round(t, 12) for t in by_path[path].__dict__.get("_umup_taus", [])]:
                raise CallError(
                    f"{type(model).__name__} called with {what}: block {path} gets other "
                    "residual taus than at transform. Transform with this call's structure."
                )
    for path, rg in graphs.items():
        if is_transformed(by_path[path]):
            add_graph(by_path[path], rg)  # modules keep the graphs they have
        else:  # inlined in the transform's call's graphs, called in this one's
            install_submodule(by_path[path], rg)
    new = [u for u in plan.uncovered if u not in installed.uncovered]
    if new and opts.parametrization == "umup":
        warnings.warn(
            f"umup_fx: a call of {type(model).__name__} with {what} runs {len(new)} op(s) "
            "no u-muP rule covers, unscaled: "
            + "; ".join(f"{op} at {src}" for _, op, src in new),
            UncoveredOpWarning,
            stacklevel=4,
        )
    add_graph(model, root)
    model.__dict__.setdefault(_SCALES_SEEN, []).append((call_key(args, kwargs), scales))


_SCALES_SEEN = "_umup_model_scales"  # per root call structure: its call_key, its dropped constants


def _refuse_ignored_arguments(model: nn.Module, args: tuple, kwargs: dict,
                              scales: dict[str, tuple], what: str) -> None:
    """A ``CallError`` when a non-tensor argument reaches only a constant the rewrite
    drops (an embedding's or the logits' multiplier: rules section 3, the model's own
    scales): the graph would ignore it. Told by comparing the dropped constants with
    those of the model's other call structures: a source line that drops another
    number, or (for calls whose tensors are the same, so only non-tensor values
    differ) one that drops a number only in one of them."""
    key = call_key(args, kwargs)
    for seen, before in model.__dict__.get(_SCALES_SEEN, []):
        same_tensors = seen[0] == key[0] and all(
            (a is TENSOR) == (b is TENSOR) for a, b in zip(seen[1], key[1], strict=True))
        lines = set(scales) | set(before) if same_tensors else set(scales) & set(before)
        for line in sorted(lines):
            if scales.get(line) != before.get(line):
                raise CallError(
                    f"{type(model).__name__} called with {what}: a non-tensor argument "
                    f"changes a constant the model multiplies in at {line} "
                    f"({_numbers(before.get(line))} in a call before, "
                    f"{_numbers(scales.get(line))} now), and u-muP drops that multiply (the "
                    "model's own scale on an embedding or the logits, which u-muP sets: "
                    "docs/rules.md section 3), so the argument would have no effect. Call "
                    "the model with the value it was transformed with, or apply the factor "
                    "outside the model."
                )


def _numbers(values: tuple | None) -> str:
    return "none" if not values else ", ".join(repr(v) for v in values)


def _describe_call(args: tuple, kwargs: dict) -> str:
    return f"{len(args)} positional argument(s) and keyword arguments {sorted(kwargs)}"


_PLAIN = (type(None), bool, int, float, complex, str, torch.dtype, torch.device)


def _refuse_inference_state(model: nn.Module, what: str, args: tuple, kwargs: dict) -> None:
    """A KV cache (``use_cache=True``, a cache object) is inference state no graph can
    take or return; the transformed model trains and evaluates without one."""
    fix = ("Call it with use_cache=False (model.generate(..., use_cache=False) for "
           "generation without a cache), or export the trained model for fast cached "
           "generation.")
    if kwargs.get("use_cache") is True:
        raise CallError(f"{type(model).__name__} was called with use_cache=True: a u-muP "
                        f"model runs without a KV cache. {fix}")
    leaves, _ = pytree.tree_flatten_with_path((tuple(args), kwargs))
    for path, x in leaves:
        if not isinstance(x, (torch.Tensor, *_PLAIN)):
            raise CallError(
                f"{type(model).__name__} was called with a {type(x).__name__} object at "
                f"{pytree.keystr(path)} ({what}): a u-muP model's graphs take tensors and "
                f"plain values only. {fix if 'cache' in type(x).__name__.lower() else ''}"
            )


def _as_written(model: nn.Module, args: Any, kwargs: dict | None, opts: Options) -> nn.Module:
    """SP baselines: the model runs as written; the analysis only sets its LR groups."""
    captured = capture(model, args, kwargs)
    plan = plan_graph(captured.gm, opts, captured.model_name)
    expand_blocks(plan, captured.gm, captured.blocks)
    parametrizations.apply(plan, opts.parametrization, opts.base, opts.sigma_init)
    model.umup_plan = plan
    for p in model.parameters():
        setattr(p, TRANSFORMED_ATTR, opts.parametrization)
    install_step_check()
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
        **options: ``roles``, ``trainable_norms``, ``reinit``, ``fp8``, ``pretrained``
            (keep the function the current weights compute: ``umup_fx.export``'s
            inverse, for continued pre-training / fine-tuning), and for a
            baseline ``parametrization`` ("mup", "sp", "sp_emb_lr"; default "umup"),
            ``base`` (the same model at the base width) and ``sigma_init`` (see
            ``Options`` and ``umup_fx.parametrizations``).

    Returns:
        ``model`` itself; train it with ``umup_fx.AdamW(model, lr=...)``.

    Raises:
        AlreadyTransformedError: ``model`` (or a submodule) was transformed before.
        CaptureError / AnalysisError: the model cannot be captured or analysed.
        AdapterError: PEFT adapters that are not LoRA on linears, or LoRA without
            ``pretrained=True`` (docs/training.md, "LoRA / PEFT").
    """
    check_fresh(model, pretrained=bool(options.get("pretrained")))
    if options.get("pretrained"):
        check_importable(model)  # before anything is installed: the model stays as it was
    if isinstance(options.get("base"), nn.Module):  # baselines: analyse the base model too
        options["base"] = parametrizations.base_shapes(
            options["base"], example_inputs, example_kwargs)
    opts = Options.build(hparams, **options)
    if opts.parametrization in ("sp", "sp_emb_lr"):
        return _as_written(model, example_inputs, example_kwargs, opts)
    captured, built, mode, first = _capture_build(
        model, example_inputs, example_kwargs, opts, ("prefix", "full", "one"))
    _warn_unkept_checkpoints(captured)
    if mode == "one" and first is not None:
        warnings.warn(
            f"umup_fx: {captured.model_name} runs as one graph ({first}); its blocks "
            "are not separate modules, so per-block fully_shard, activation "
            "checkpointing and compile do not apply.",
            OneGraphWarning,
            stacklevel=2,
        )
    elif not captured.blocks and (repeats := discovery.unlisted_repeats(model)):
        warnings.warn(
            f"umup_fx: {captured.model_name} runs as one graph: it has no list of blocks "
            "(an nn.ModuleList, ModuleDict or Sequential of two or more layers), and "
            f"{', '.join(repeats[:4])} look like blocks held as attributes. Keep them in an "
            "nn.ModuleList or ModuleDict so each runs as a module of its own (per-block "
            "fully_shard, activation checkpointing and compile).",
            OneGraphWarning,
            stacklevel=2,
        )
    plan = built[0]
    weighty = {path: why for path, why in built[6].items()
               if any(True for _ in _modules_by_path(model)[path].parameters())}
    if weighty:
        listed = "; ".join(f"{path} ({why})" for path, why in list(weighty.items())[:4])
        warnings.warn(
            f"umup_fx: {len(weighty)} submodule(s) of {captured.model_name} with weights are "
            f"not called as modules after transform: {listed}. Their ops run inside their "
            "caller's graph, so hooks on them do not fire and they cannot be FSDP2 or "
            "tensor-parallel units of their own; shard or hook their caller instead "
            "(model.inlined_calls lists them all).",
            InlinedCallWarning,
            stacklevel=2,
        )
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
    reference = _reference_of(model, example_inputs, example_kwargs)
    _install(model, captured, built,
             functools.partial(_add_call_structure, opts=opts, mode=mode, reference=reference),
             _settings(opts, reference))
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    model.__dict__[_SCALES_SEEN] = [(call_key(args, dict(example_kwargs or {})), built[5])]
    initialise(model, plan, opts.reinit)
    if opts.pretrained:  # the inverse of export: the same function, u-muP's weights
        import_pretrained(model)
    guard_tree(model)  # adapters (or any module) put in later would never be called
    for p in model.parameters():  # the "umup" backend must not rewrite it again, and an
        setattr(p, TRANSFORMED_ATTR, opts.parametrization)  # optimizer needs u-muP's groups
    install_step_check()  # warns on an optimizer not built from them
    if opts.check and opts.parametrization == "umup" and opts.reinit and unit_check.cheap(model):
        unit_check.warn_if_off(model, example_inputs, example_kwargs)  # rules §8
    return model
