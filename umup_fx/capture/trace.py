"""Capture: an ``nn.Module`` plus example inputs becomes one ATen-level FX graph.

Why ``torch.export.export(strict=False)``: it traces through models that
``torch.fx.symbolic_trace`` cannot (Hugging Face transformers, anything that reads
tensor shapes), gives one graph or a clear error (no silent graph breaks), puts a
fake value with its shape on every node (``node.meta["val"]``), and records which
placeholder is which parameter (the graph signature). Its ops are ATen overloads
(``aten.linear.default``), stable across torch versions, so rules never match Python
names. The ``torch.compile`` backend captures with Dynamo and then runs the same
export on Dynamo's graph, so both entry points hand the passes the same IR.

Batch and sequence dims are exported as dynamic (``Dim.AUTO``), so a transformed
model accepts other batch sizes and sequence lengths than the example's.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
import logging
import os
import re
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils.checkpoint as cp
from torch import fx, nn
from torch.export import Dim, ExportedProgram
from torch.export.graph_signature import InputKind
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from umup_fx import meta
from umup_fx.capture import blocks as discovery
from umup_fx.capture.shadow import shadow_inputs, shadowed
from umup_fx.errors import AnalysisError, CaptureError
from umup_fx.runtime.graph_errors import expect_sizes
from umup_fx.runtime.names import canonical_name

_TORCH_DIR = os.path.dirname(torch.__file__)
_UMUP_DIR = os.path.dirname(__file__)


@dataclass
class ParamInfo:
    """A parameter as the graph sees it."""

    name: str  # canonical name: first in model.named_parameters()
    shape: tuple[int, ...]
    aliases: tuple[str, ...] = ()  # other names of the same tensor (tied weights)
    node: str | None = None  # placeholder node name; None if the graph never uses it
    requires_grad: bool = True
    tensor: Any = None  # the parameter itself (the compile backend's graphs only)


@dataclass
class Captured:
    """The captured graph plus what is needed to call it like the original model."""

    gm: fx.GraphModule
    params: dict[str, ParamInfo]
    program: ExportedProgram | None = None
    model_name: str = "model"
    blocks: list[discovery.BlockList] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)  # submodule calls preserved, canonical
    # torch.utils.checkpoint calls the forward made (the graph holds no recompute):
    checkpointed: dict[str, dict[str, Any]] = field(default_factory=dict)  # whole modules
    other_checkpoints: list[str] = field(default_factory=list)  # anything else


def _user_frame(exc: BaseException) -> str | None:
    """The innermost traceback frame outside torch and umup_fx: where the model failed."""
    frames = traceback.extract_tb(exc.__traceback__)
    user = [
        f
        for f in frames
        if not f.filename.startswith(_TORCH_DIR) and not f.filename.startswith(_UMUP_DIR)
    ]
    if not user:
        return None
    f = user[-1]
    return f"{f.filename}:{f.lineno}, in {f.name}: {(f.line or '').strip()}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict,
                    batch_only: bool = False) -> dict[str, Any]:
    """Dim.AUTO on every axis of every tensor input (``batch_only``: on the leading axis
    only, the others static): export keeps dynamic what it can."""

    def spec(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            axes = range(min(x.dim(), 1) if batch_only else x.dim())
            return {i: Dim.AUTO for i in axes} if x.dim() else None
        if isinstance(x, (list, tuple)):
            return type(x)(spec(v) for v in x)
        if isinstance(x, dict):
            return {k: spec(v) for k, v in x.items()}
        return None

    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    return {name: spec(value) for name, value in bound.arguments.items()}


def _check_inputs(model: nn.Module, args: tuple, kwargs: dict) -> None:
    try:
        inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError as exc:
        raise CaptureError(
            f"The example inputs do not fit {type(model).__name__}.forward"
            f"{inspect.signature(model.forward)}: {exc}. Pass example_inputs as a tuple of "
            "positional arguments (and example_kwargs for keyword arguments), the same as "
            "you would call the model."
        ) from None


# Config fields of train-time randomness drawn in Python, which a graph cannot hold:
# LayerDrop skips a layer when a draw falls below it, SpecAugment builds its masks with
# numpy (transformers' speech encoders; ``apply_spec_augment`` turns the masks off).
_TRAIN_TIME_DRAWS = ("layerdrop", "encoder_layerdrop", "decoder_layerdrop", "mask_time_prob",
                     "mask_feature_prob")


def _train_time_draws(model: nn.Module) -> list[str]:
    """``config.<field> = <value>`` for each train-time draw a training model has on."""
    config = getattr(model, "config", None)
    if config is None or not model.training:
        return []
    masks = bool(getattr(config, "apply_spec_augment", True))
    return [f"config.{k} = {getattr(config, k)}" for k in _TRAIN_TIME_DRAWS
            if isinstance(getattr(config, k, None), (int, float)) and getattr(config, k) > 0
            and (masks or not k.startswith("mask_"))]


def _explain_failure(model: nn.Module, args: tuple, kwargs: dict, exc: Exception) -> CaptureError:
    """Tell apart wrong inputs (eager fails too) from an untraceable model."""
    name = type(model).__name__
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception as eager_exc:  # noqa: BLE001 - we re-raise with a better message
        where = _user_frame(eager_exc)
        return CaptureError(
            f"{name} fails on the example inputs even without umup_fx: "
            f"{_first_line(eager_exc)}" + (f"\n  at {where}" if where else "") + "\n"
            "Check the example inputs' shapes and dtypes (they must be a valid call of the "
            "model)."
        )
    where = _user_frame(exc)
    draws = _train_time_draws(model)
    if draws:  # the cause and the fix first: the raw failure is numpy's or a guard's
        fields = " and ".join(d.split(" =")[0] + " = 0.0" for d in draws)
        return CaptureError(
            f"Could not capture {name} as one graph: set {fields} before transform. In "
            f"training mode it draws random numbers in Python ({', '.join(draws)}: LayerDrop "
            "skips layers by a draw, SpecAugment builds its masks with numpy), which one "
            f"graph cannot hold. The capture failed with {_first_line(exc)}"
            + (f"\n  at {where}" if where else "")
        )
    text = str(exc)
    if "data-dependent" in text or "GuardOnDataDependent" in type(exc).__name__:
        hint = (
            "The model branches on the value of a tensor (Python control flow on data). "
            "Make the branch static (compute it from shapes or config), or express it "
            "with torch.where / torch.cond."
        )
        if where and "expert" in where.lower() and "BF16" not in text:
            hint = (
                "This looks like a loop over mixture-of-experts experts, run on the tokens "
                "routed to each: its trip count depends on the routing. Stack the experts' "
                "weights [E, out, in] and call torch._grouped_mm (or compute every expert "
                "with einsum and weight by the gates); a transformers model does this when "
                "built with experts_implementation=\"grouped_mm\" (its default)."
            )
    elif "Expected inputs of BF16" in text:
        hint = (
            "torch._grouped_mm traces in bfloat16 only (torch's own rule), and a model on "
            "'meta' is captured on float64 stand-ins. Transform the model with real bf16 "
            "weights (model.to_empty(device=...) first), or route the experts through "
            "einsum."
        )
    else:
        hint = (
            "umup_fx captures models with torch.export.export(strict=False); make the "
            "forward traceable there (no data-dependent Python control flow, no tensor "
            "values turned into Python numbers), or pass a traceable wrapper module."
        )
    return CaptureError(
        f"Could not capture {name} as one graph: {_first_line(exc)}"
        + (f"\n  at {where}" if where else "")
        + f"\n{hint}"
    )


def _unalias(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Clone repeated example tensors: export would merge inputs that are one tensor
    (``model(idx, idx)``) and the graph would read the wrong one at run time."""
    seen: set[int] = set()

    def fresh(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            if id(x) in seen:
                return x.clone()
            seen.add(id(x))
        return x

    return (
        tuple(fresh(a) for a in args),
        {k: fresh(v) for k, v in kwargs.items()},
    )


def _canonical_names(model: nn.Module) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Map every parameter name to (canonical name, all names of that tensor)."""
    by_tensor: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(p), []).append(name)
    out: dict[str, tuple[str, tuple[str, ...]]] = {}
    for names in by_tensor.values():
        names = [canonical_name(n) for n in names]
        for n in names:
            out[n] = (names[0], tuple(names))
    return out


_NOISY_LOGGERS = ("torch._export", "torch.export", "torch.fx.experimental.symbolic_shapes",
                   "torch._subclasses.fake_tensor")


@contextlib.contextmanager
def _quiet_export() -> Any:
    """Export logs warnings (a size-1 dim specialised, a fake kernel failing before the
    real error), warns of its own deprecations, and prints the partial graph of a failed
    trace to stderr, all before our one-message error; the message is enough. ``UMUP_FX_DEBUG=1`` lets them through."""
    if os.environ.get("UMUP_FX_DEBUG"):
        yield
        return
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        # torch's own deprecation notices from inside export (torch 2.13: pytree's
        # LeafSpec) are not the user's to act on, and under ``-W error`` they would
        # fail the capture.
        with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


@contextlib.contextmanager
def _named_kwargs(model: nn.Module, kwargs: dict) -> Any:
    """Show keyword arguments that ``forward(self, x, **kwargs)`` collects as named
    keyword-only parameters while exporting: torch.export's dynamic-shape bookkeeping
    lists such arguments twice and fails ("Must provide a tree_name")."""
    sig = inspect.signature(model.forward)
    extra = [k for k in kwargs if k not in sig.parameters]
    if not extra or not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        yield
        return
    forward = model.forward

    def named(*a: Any, **k: Any) -> Any:
        return forward(*a, **k)

    kept = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
    named.__signature__ = sig.replace(  # type: ignore[attr-defined]
        parameters=kept + [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY) for k in extra])
    saved = model.__dict__.get("forward")
    model.__dict__["forward"] = named
    try:
        yield
    finally:
        if saved is None:
            del model.__dict__["forward"]
        else:
            model.__dict__["forward"] = saved


@contextlib.contextmanager
def _recording_checkpoints() -> Any:
    """Record what ``torch.utils.checkpoint.checkpoint`` is asked to recompute while
    exporting: non-strict export runs it as a plain call, so the graph holds no
    recompute, and whoever installs the graph must put it back (or say it cannot)."""
    seen: list[tuple[Any, dict[str, Any]]] = []
    generator, reentrant = cp._checkpoint_without_reentrant_generator, cp.CheckpointFunction

    def non_reentrant(fn: Any, preserve_rng_state: bool = True, *args: Any, **kwargs: Any) -> Any:
        seen.append((fn, {"use_reentrant": False, "preserve_rng_state": preserve_rng_state}))
        return generator(fn, preserve_rng_state, *args, **kwargs)

    class Reentrant:
        @staticmethod
        def apply(fn: Any, preserve_rng_state: bool, *args: Any) -> Any:
            seen.append((fn, {"use_reentrant": True, "preserve_rng_state": preserve_rng_state}))
            return reentrant.apply(fn, preserve_rng_state, *args)

    cp._checkpoint_without_reentrant_generator, cp.CheckpointFunction = non_reentrant, Reentrant
    try:
        yield seen
    finally:
        cp._checkpoint_without_reentrant_generator, cp.CheckpointFunction = generator, reentrant


def _checkpointed_module(fn: Any) -> nn.Module | None:
    """The module a checkpointed function calls whole: the module, its ``__call__`` or
    ``forward``, or a ``functools.partial`` of those; else None."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    if isinstance(fn, nn.Module):
        return fn
    owner = getattr(fn, "__self__", None)
    if isinstance(owner, nn.Module) and getattr(fn, "__name__", "") in (
            "__call__", "forward", "_call_impl", "_wrapped_call_impl"):
        return owner
    return None


def _checkpoints(model: nn.Module, seen: list[tuple[Any, dict[str, Any]]]
                 ) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """({module path: checkpoint options} of whole modules checkpointed by their
    caller, [what else was checkpointed]). A module whose own ``__call__`` checkpoints
    (HF's GradientCheckpointingLayer) still does so when installed: not listed."""
    paths = {id(m): canonical_name(n) for n, m in model.named_modules()}
    parents = {id(c): m for m in model.modules() for c in m.children()}
    whole: dict[str, dict[str, Any]] = {}
    other: list[str] = []
    for fn, options in seen:
        module = _checkpointed_module(fn)
        if module is not None and id(module) in paths:
            if type(module).__call__ is nn.Module.__call__:
                # A user's checkpoint wrapper (no tensors of its own, one child, which it
                # checkpoints): checkpointing the wrapper's call recomputes the same.
                parent = parents.get(id(module))
                if (parent is not None and len(parent._modules) == 1
                        and not parent._parameters and not parent._buffers):
                    module = parent
                whole[paths[id(module)]] = options
            continue
        name = getattr(fn, "__qualname__", None) or type(fn).__name__
        other.append(f"{name} ({paths.get(id(module), '?')})" if module is not None else name)
    return whole, other


@contextlib.contextmanager
def _no_kv_cache(model: nn.Module) -> Any:
    """Capture with an HF model's KV cache off (``config.use_cache``, True by default):
    the cache is an inference concern, and its object is no tensor a graph can return."""
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", None) is not True:
        yield
        return
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = True


def _export(model: nn.Module, args: tuple, kwargs: dict, block_lists: list,
            preserve: tuple[str, ...], shadow: bool) -> tuple[ExportedProgram, str | None]:
    """The export, and why its sizes past the batch axis are the example's (None: they
    are dynamic, as far as export kept them)."""
    if shadow:
        args, kwargs = shadow_inputs(args, kwargs)
    with discovery.truncated(model, block_lists), _quiet_export(), (
        shadowed(model) if shadow else contextlib.nullcontext()
    ), _named_kwargs(model, kwargs), _no_kv_cache(model):
        try:
            return torch.export.export(model, args, kwargs, strict=False,
                                       dynamic_shapes=_dynamic_shapes(model, args, kwargs),
                                       preserve_module_call_signature=preserve), None
        except AssertionError as exc:
            if _SIZE_ARGUMENT not in str(exc):
                raise
            where = _user_frame(exc)
        # A size computed from the inputs is a block call's argument (Swin's
        # input_dimensions): a kept block signature takes tensors and numbers only, so
        # the sizes past the batch axis are the example's (rules.md "Static sizes").
        program = torch.export.export(
            model, args, kwargs, strict=False, preserve_module_call_signature=preserve,
            dynamic_shapes=_dynamic_shapes(model, args, kwargs, batch_only=True))
    return program, (f"it passes a size computed from its inputs to a block call"
                     f"{f' (at {where})' if where else ''}, which a block's kept signature "
                     "cannot take as a variable")


_SIZE_ARGUMENT = "Only Tensors or scalars are supported as pytree flattened inputs"


class StaticSizeWarning(UserWarning):
    """The capture fixed an input axis at the example's size (a batch of 1, a sequence as
    long as a table the model slices by it, Swin's window sizes): the transformed model
    takes only that size there, and another is a CallError saying so."""


def _fix_sizes(program: ExportedProgram, model: str, why: str | None) -> None:
    """Check the input axes the capture fixed at the example's size, and warn once.

    Every axis was asked dynamic (``Dim.AUTO``); export fixes one it cannot keep free:
    a size of 1, one equal to a size the model slices a table or mask to, or (``why``)
    all past the batch axis. Where the graph computes with that size (it does not run
    at another, ``_runs_at_other_sizes``; under ``why`` always), another size would fail
    deep inside the graph or run the blocks at the example's sizes, so each user input
    with a fixed data axis (the batch axis, an axis of integer inputs such as token ids;
    every fixed axis under ``why``) gets an ``expect_sizes`` check: a CallError naming
    the size.
    """
    gm = program.graph_module
    users = set(program.graph_signature.user_inputs)
    checks = []
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if node.op != "placeholder" or node.name not in users or not isinstance(
                val, torch.Tensor) or not val.dim():
            continue
        sizes = tuple(int(s) if is_concrete_int(s) and (why or k == 0 or not val.is_floating_point())
                      else None for k, s in enumerate(val.shape))
        if any(s is not None for s in sizes):
            checks.append((node, sizes))
    if not checks or (why is None and _runs_at_other_sizes(gm, dict(checks))):
        return  # export's 1 for a batch of one is often a size the graph never uses
    last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    for node, sizes in checks:
        with gm.graph.inserting_after(last):
            gm.graph.call_function(expect_sizes, (node, sizes, model, node.name))
    gm.recompile()
    fixed = "; ".join(f"{node.name} {_shape_text(sizes)}" for node, sizes in checks)
    cause = why or ("export fixes a size of 1, and one equal to a size the model slices a "
                    "table or mask to (a sequence as long as its maximum)")
    advice = ("Transform with example inputs of the size you train at." if why else
              "To keep them free, transform with example inputs of batch >= 2 and a "
              "sequence shorter than the model's maximum length.")
    warnings.warn(
        f"umup_fx: {model}'s capture fixed input sizes at the example's ({fixed}): {cause}. "
        f"The transformed model takes only those sizes there (another is a CallError). "
        f"{advice}", StaticSizeWarning, stacklevel=4)


def _runs_at_other_sizes(gm: fx.GraphModule, fixed: dict[fx.Node, tuple]) -> bool:
    """Whether ``gm`` runs (on fake tensors: shapes only) with each fixed axis one
    shorter (one longer from 1 or 2): a fixed size the graph does not compute with."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def size(s: Any) -> int:  # the example's value of a (symbolic) size
        hint = getattr(getattr(s, "node", None), "hint", None)
        return int(s if hint is None else hint)

    def stand_in(node: fx.Node) -> Any:
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            return size(val) if isinstance(val, torch.SymInt) else val
        shape = [size(s) for s in val.shape]
        for k, s in enumerate(fixed.get(node, ())):
            if s is not None:
                shape[k] = s - 1 if s > 2 else s + 1
        return torch.empty(shape, dtype=val.dtype, device=val.device)

    try:
        with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad(), _quiet_export():
            inputs = [stand_in(n) for n in gm.graph.nodes if n.op == "placeholder"]
            fx.Interpreter(gm).run(*inputs)
    except Exception:  # noqa: BLE001 - it does not: the size is the graph's
        return False
    return True


def _shape_text(sizes: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("*" if s is None else str(s) for s in sizes) + "]"


def _check_constants(model: nn.Module, program: ExportedProgram) -> None:
    """A tensor the forward makes from Python values (``x[..., [-2], :]``) is made next to
    the shadow's inputs, on ``meta``: its values are lost, so the capture cannot be used."""
    buffers = {canonical_name(n) for n, _ in model.named_buffers()}
    lost = [n for n, t in program.constants.items()
            if isinstance(t, torch.Tensor) and t.is_meta and canonical_name(n) not in buffers]
    if lost:
        raise RuntimeError(
            f"the forward makes tensor constants on the inputs' device ({', '.join(lost[:3])}); "
            "capture them on real weights"
        )


def capture(
    model: nn.Module,
    example_inputs: tuple | list | torch.Tensor,
    example_kwargs: dict[str, Any] | None = None,
    *,
    blocks: bool = True,
    full: bool = False,
) -> Captured:
    """Export ``model`` to one ATen graph and label its placeholders.

    With ``blocks``, each block list (``discovery.find_blocks``) is cut to the prefix that
    shows every distinct block twice, and those blocks' call signatures are preserved
    (``program.module_call_graph``) so ``passes.cut_regions`` can cut the graph back into
    per-block graphs (``full`` keeps every block). The export runs on the model's meta/float64 shadow
    (``capture.shadow.shadowed``): no weight is read, so models on ``meta`` transform as they are.

    Writes ``node.meta["umup"]["kind"]`` on every placeholder and
    ``node.meta["umup"]["param"]`` on parameter placeholders, and
    ``gm.meta["umup"]["params"]``.

    Raises:
        CaptureError: the inputs do not fit the model, or the model cannot be traced.
        AnalysisError: the model has no parameters.
    """
    if not isinstance(model, nn.Module):
        raise CaptureError(f"Expected an nn.Module, got {type(model).__name__}.")
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    kwargs = dict(example_kwargs or {})
    if not any(True for _ in model.parameters()):
        raise AnalysisError(
            f"{type(model).__name__} has no parameters: there is nothing for u-muP to scale "
            "or train. Pass the module that owns the weights."
        )
    _check_inputs(model, args, kwargs)
    if kwargs.get("use_cache") is True:
        raise CaptureError(
            "use_cache=True asks for a KV cache, an inference object no graph can return. "
            "Transform with use_cache=False (or without it: the capture turns the cache "
            "off); export the trained model (umup_fx.export) for cached generation."
        )
    args, kwargs = _unalias(args, kwargs)
    block_lists = discovery.find_blocks(model) if blocks else []
    for b in block_lists:
        discovery.choose_prefix(b, full)
    with discovery.truncated(model, block_lists):
        called = discovery.callable_modules(model)
    preserve = tuple(dict.fromkeys(
        [*(b.block_path(i) for b in block_lists for i in range(b.kept)), *called]))
    with _recording_checkpoints() as seen:
        try:
            program, why = _export(model, args, kwargs, block_lists, preserve, shadow=True)
            _check_constants(model, program)
        except CaptureError:
            raise
        except Exception as exc:  # noqa: BLE001 - turned into a readable CaptureError
            on_meta = any(p.is_meta for p in model.parameters())
            if on_meta:
                raise _explain_failure(model, args, kwargs, exc) from exc
            # Models that make tensors on the CPU without device= fail next to meta weights,
            # and torch._grouped_mm's fake kernel takes bf16 only (not the float64
            # stand-ins): they capture on their real weights (device and dtype baked in).
            seen.clear()
            try:
                program, why = _export(model, args, kwargs, block_lists, preserve,
                                       shadow=False)
            except Exception as exc2:  # noqa: BLE001
                raise _explain_failure(model, args, kwargs, exc2) from exc2
    checkpointed, other_checkpoints = _checkpoints(model, seen)

    _fix_sizes(program, type(model).__name__, why)
    gm = program.graph_module
    _portable_histc(gm)
    _drop_self_copies(gm)
    params: dict[str, ParamInfo] = {}
    with discovery.truncated(model, block_lists):  # the parameters the graph sees
        names = _canonical_names(model)
        for name, p in model.named_parameters():
            canonical, aliases = names[canonical_name(name)]
            params[canonical] = ParamInfo(
                canonical, tuple(p.shape), aliases, requires_grad=p.requires_grad
            )

    kinds = {
        InputKind.PARAMETER: "param",
        InputKind.BUFFER: "buffer",
        InputKind.CONSTANT_TENSOR: "constant",
        InputKind.USER_INPUT: "input",
    }
    by_name = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    for spec in program.graph_signature.input_specs:
        node = by_name[spec.arg.name]
        m = meta.node_meta(node)
        m[meta.KIND] = kinds.get(spec.kind, "input")
        if spec.kind == InputKind.PARAMETER:
            canonical = names[canonical_name(spec.target)][0]
            m[meta.PARAM] = canonical
            params[canonical].node = node.name
    meta.graph_meta(gm)[meta.PARAMS] = params
    return Captured(gm=gm, params=params, program=program, model_name=type(model).__name__,
                    blocks=block_lists, modules=[canonical_name(n) for n in called],
                    checkpointed=checkpointed,
                    other_checkpoints=sorted(set(other_checkpoints)))


_SAME_VALUE = tuple(op for name in ("to.dtype", "to.device", "to.dtype_layout", "_to_copy.default",
                                     "alias.default", "detach.default", "clone.default")
                    if (op := getattr(getattr(torch.ops.aten, name.split(".")[0]),
                                      name.split(".")[1], None)) is not None)


def _drop_self_copies(gm: fx.GraphModule) -> None:
    """``self.buf = self.buf.to(x.device)`` (Meta's llama, on its ``freqs_cis``) captures as
    ``buf.copy_(buf.to(...))``: a write of the buffer's own values, in place. Run, it bumps
    the buffer's version after the forward saved slices of it for the backward, which
    then fails; the original only rebinds a name. Such a copy is dropped."""
    for node in list(gm.graph.nodes):
        if node.target is not torch.ops.aten.copy_.default:
            continue
        dst, value = node.args[:2]
        while isinstance(value, fx.Node) and value.target in _SAME_VALUE and value is not dst:
            value = value.args[0]
        if value is dst and node.args[1].meta["val"].dtype == dst.meta["val"].dtype:
            cast = node.args[1]
            node.replace_all_uses_with(dst)
            gm.graph.erase_node(node)
            while isinstance(cast, fx.Node) and cast is not dst and not cast.users:
                cast, dead = cast.args[0], cast  # the cast chain it read, now unused
                gm.graph.erase_node(dead)
    gm.recompile()


def _portable_histc(gm: fx.GraphModule) -> None:
    """The shadow capture runs on ``meta``, so a branch on the device type takes its
    non-CPU side: transformers' MoE counts tokens per expert with ``histc`` on integers,
    which only CUDA has. Counting the same small integers as float32 is exact on every
    device, so the captured graph casts them."""
    for node in list(gm.graph.nodes):
        if node.target is torch.ops.aten.histc.default:
            x = node.args[0]
            if isinstance(x, fx.Node) and not x.meta["val"].is_floating_point():
                with gm.graph.inserting_before(node):
                    cast = gm.graph.call_function(torch.ops.aten.to.dtype, (x, torch.float32))
                cast.meta["val"] = x.meta["val"].to(torch.float32)
                node.replace_input_with(x, cast)
    gm.recompile()


def dynamo_sources(dynamo_gm: fx.GraphModule) -> list[str | None]:
    """Where Dynamo took each graph input from (``L['idx']``, ``L['self']._modules[...]``),
    in order. Dynamo drops this record once a backend has returned, so a backend that
    compiles later (per size) keeps the list."""
    out = []
    for node in dynamo_gm.graph.nodes:
        if node.op == "placeholder":
            source = getattr(node.meta.get("grapharg"), "source", None)
            out.append(None if source is None else source.name)
    return out


def _source_name(source: str | None) -> str | None:
    """The model path of a graph input Dynamo took from: L['self']._modules['fc']... -> fc."""
    if source is None:
        return None
    parts = re.findall(r"\['([^']*)'\]|\.(\w+)", source)
    names = [a or b for a, b in parts]
    keep = [n for n in names[1:] if n not in ("_modules", "_parameters", "_buffers")]
    return ".".join(keep) or None


def capture_dynamo_graph(dynamo_gm: fx.GraphModule, example_inputs: list[Any],
                         sources: list[str | None] | None = None,
                         dynamic_shapes: tuple | None = None) -> Captured:
    """Re-capture a Dynamo graph with the same export as ``capture`` (same ATen IR).

    Dynamo hands a backend the model's parameters as graph inputs; each becomes a
    parameter placeholder named by its model path (``sources``, else
    ``dynamo_sources``), so the passes see what ``capture`` gives them. Shapes are static
    here (Dynamo guards on them and recompiles) unless ``dynamic_shapes`` says otherwise.
    """
    inputs = tuple(example_inputs)
    if not all(isinstance(x, (torch.Tensor, int, float, bool)) for x in inputs):
        kinds = sorted({type(x).__name__ for x in inputs})
        raise CaptureError(
            f"The umup backend got graph inputs it cannot export ({', '.join(kinds)}): "
            "sizes Dynamo made dynamic after a shape change. Compile with "
            "torch.compile(model, backend='umup', dynamic=False), or transform the model "
            "(umup_fx.transform, whose graphs take any batch and sequence size) and "
            "compile that."
        )
    if dynamic_shapes is not None and any(
        p.kind is inspect.Parameter.VAR_POSITIONAL
        for p in inspect.signature(dynamo_gm.forward).parameters.values()
    ):
        dynamic_shapes = (dynamic_shapes,)  # a lazy graph module's forward(*args)
    try:
        program = torch.export.export(dynamo_gm, inputs, strict=False,
                                      dynamic_shapes=dynamic_shapes)
    except Exception as exc:  # noqa: BLE001 - turned into a readable CaptureError
        raise CaptureError(
            f"The umup backend could not re-capture Dynamo's graph: {_first_line(exc)}. "
            "Use umup_fx.transform(model, example_inputs) and torch.compile the result."
        ) from exc
    dynamo_placeholders = [n for n in dynamo_gm.graph.nodes if n.op == "placeholder"]
    sources = dynamo_sources(dynamo_gm) if sources is None else sources
    gm = program.graph_module
    by_name = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    params: dict[str, ParamInfo] = {}
    user_index = 0
    for spec in program.graph_signature.input_specs:
        node = by_name[spec.arg.name]
        m = meta.node_meta(node)
        if spec.kind != InputKind.USER_INPUT:
            m[meta.KIND] = "buffer" if spec.kind == InputKind.BUFFER else "constant"
            continue
        value, source = inputs[user_index], sources[user_index]
        name = _source_name(source) or dynamo_placeholders[user_index].name
        user_index += 1
        if isinstance(value, nn.Parameter):
            m[meta.KIND], m[meta.PARAM] = "param", name
            params[name] = ParamInfo(name, tuple(value.shape), (name,), node.name,
                                     value.requires_grad, tensor=value)
        else:  # a module's buffer (rotary tables) is no data: its sizes are not fixed
            m[meta.KIND] = "buffer" if "._buffers[" in (source or "") else "input"
    meta.graph_meta(gm)[meta.PARAMS] = params
    return Captured(gm=gm, params=params, program=program, model_name="compiled graph")
