"""``umup_fx.transform``: an unmodified model in, a trainable u-muP model out.

The returned ``UmupModule`` owns the original model's submodules, parameters and
buffers under the same names (so ``state_dict`` keys, ``named_parameters`` and
checkpoints are unchanged) and runs the rewritten graph instead of the original
``forward``. The graph takes its inputs flat, in the order the capture recorded
(parameters, buffers, constants, user inputs, then the training flag).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx, nn
from torch.export.graph_signature import InputKind, OutputKind

from . import meta
from .capture import capture
from .errors import AlreadyTransformedError, UmupError
from .init import initialise
from .options import Options
from .pipeline import run_pipeline
from .plan import Plan

_MARK = "_umup_transformed"


class UncoveredOpWarning(UserWarning):
    """An op on the activation path that no u-muP rule covers runs unscaled."""


class UmupModule(nn.Module):
    """A model rewritten to u-muP. Same parameter names as the model it came from.

    Attributes:
        umup_plan: the ``Plan`` (``print(model.umup_plan)`` or ``umup_fx.explain``).
        graph_module: the rewritten ``fx.GraphModule`` (``.code`` shows it).
        original_graph: the captured graph before the rewrite, for comparison.
    """

    umup_plan: Plan

    def __init__(
        self,
        model: nn.Module,
        gm: fx.GraphModule,
        original: fx.GraphModule,
        plan: Plan,
        inputs: list[tuple[str, str]],
        outputs: list[tuple[str, str | None]],
        call: tuple[int, tuple[str, ...]],
        in_spec: pytree.TreeSpec,
        out_spec: pytree.TreeSpec,
        constants: dict[str, torch.Tensor],
    ) -> None:
        super().__init__()
        # Share the model's state under the same names (not a copy: one set of weights).
        self._modules.update(model._modules)
        self._parameters.update(model._parameters)
        self._buffers.update(model._buffers)
        self._non_persistent_buffers_set |= model._non_persistent_buffers_set
        # Lifted tensor constants become non-persistent buffers, so .to() moves them.
        renamed = {name: f"_umup_constant_{i}" for i, name in enumerate(constants)}
        for name, value in constants.items():
            self.register_buffer(renamed[name], value, persistent=False)
        inputs = [(k, renamed[t] if k == "constant" else t) for k, t in inputs]
        # Plain attributes, not submodules: they hold no state of their own.
        object.__setattr__(self, "graph_module", gm)
        object.__setattr__(self, "original_graph", original)
        object.__setattr__(self, "umup_plan", plan)
        self._umup_inputs = inputs
        self._umup_outputs = outputs
        self._umup_call = call  # (number of positional args, keyword names in order)
        self._umup_in_spec = in_spec
        self._umup_out_spec = out_spec
        self._umup_model_name = type(model).__name__
        first = next(iter(model.parameters()))
        self._umup_placement = (first.device, first.dtype)

    def _flatten_inputs(self, args: tuple, kwargs: dict) -> list[Any]:
        n_args, expected_kwargs = self._umup_call
        if len(args) != n_args or set(kwargs) != set(expected_kwargs):
            raise TypeError(self._structure_error(args, kwargs))
        kwargs = {k: kwargs[k] for k in expected_kwargs}
        flat, spec = pytree.tree_flatten((args, kwargs))
        if spec != self._umup_in_spec:
            raise TypeError(self._structure_error(args, kwargs))
        return flat

    def _check_placement(self) -> None:
        first = next(iter(self.parameters()))
        device, dtype = self._umup_placement
        if first.device != device or first.dtype != dtype:
            raise UmupError(
                f"This u-muP {self._umup_model_name} was captured on {device} / {dtype} and "
                f"its weights are now on {first.device} / {first.dtype}. The captured graph "
                "bakes in device and dtype: move the model (model.to(...)) before "
                "umup_fx.transform, and use torch.autocast for mixed precision."
            )

    def _structure_error(self, args: tuple, kwargs: dict) -> str:
        n_args, names = self._umup_call
        return (
            f"This u-muP {self._umup_model_name} was captured for calls with {n_args} "
            f"positional argument(s) and keyword arguments {list(names)}; it got "
            f"{len(args)} positional and {sorted(kwargs)}. The graph is fixed at transform "
            "time: transform with example inputs of the call you make (for example "
            "include the targets if the model computes its loss)."
        )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.finish(self.graph_module(*self.graph_inputs(args, kwargs)))

    def graph_inputs(self, args: tuple, kwargs: dict) -> list[Any]:
        """The flat argument list ``graph_module`` takes for the call ``(*args, **kwargs)``."""
        self._check_placement()
        user = iter(self._flatten_inputs(args, kwargs))
        values: list[Any] = []
        for kind, target in self._umup_inputs:
            if kind == "input":
                values.append(next(user))
            elif kind == "training":
                values.append(self.training)
            elif kind == "param":
                values.append(self.get_parameter(target))
            else:
                values.append(self.get_buffer(target))
        return values

    def finish(self, results: Any) -> Any:
        """Write back mutated buffers and rebuild the model's output structure."""
        user_outputs = []
        for (kind, target), value in zip(self._umup_outputs, results, strict=True):
            if kind == "buffer":
                with torch.no_grad():
                    self.get_buffer(target).copy_(value)  # type: ignore[arg-type]
            else:
                user_outputs.append(value)
        return pytree.tree_unflatten(user_outputs, self._umup_out_spec)

    def extra_repr(self) -> str:
        return f"u-muP {self._umup_model_name}: {len(self.umup_plan.params)} parameters"


def _already_transformed(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, UmupModule) or getattr(module, _MARK, False):
            where = f"its submodule {name!r}" if name else "it"
            raise AlreadyTransformedError(
                f"{type(model).__name__} cannot be transformed: {where} was already "
                "transformed by umup_fx (and its weights re-initialised). Transform a fresh "
                "model once; to change hparams or options, build the model again."
            )


def _signature(program: torch.export.ExportedProgram, gm: fx.GraphModule) -> tuple[list, list]:
    sig = program.graph_signature
    kinds = {
        InputKind.PARAMETER: "param",
        InputKind.BUFFER: "buffer",
        InputKind.CONSTANT_TENSOR: "constant",
        InputKind.USER_INPUT: "input",
    }
    inputs = []
    for spec in sig.input_specs:
        if spec.kind not in kinds:
            raise UmupError(f"umup_fx cannot feed graph input {spec.arg.name} of kind {spec.kind}.")
        inputs.append((kinds[spec.kind], spec.target or spec.arg.name))
    training = meta.graph_meta(gm).get(meta.TRAINING)
    if training is not None:
        inputs.append(("training", training))
    outputs = []
    for spec in sig.output_specs:
        if spec.kind == OutputKind.USER_OUTPUT:
            outputs.append(("user", None))
        elif spec.kind == OutputKind.BUFFER_MUTATION:
            outputs.append(("buffer", spec.target))
        else:
            raise UmupError(
                f"umup_fx cannot handle graph output {spec.arg} of kind {spec.kind} "
                "(for example an in-place update of a model input)."
            )
    return inputs, outputs


def _call_shape(example_inputs: Any, example_kwargs: dict | None) -> tuple[int, tuple[str, ...]]:
    n_args = 1 if isinstance(example_inputs, torch.Tensor) else len(example_inputs)
    return n_args, tuple(example_kwargs or {})


def transform(
    model: nn.Module,
    example_inputs: Any,
    example_kwargs: dict[str, Any] | None = None,
    *,
    hparams: Any = None,
    **options: Any,
) -> UmupModule:
    """Rewrite ``model`` into u-muP: scaled ops, unit init, non-parametric norms.

    Args:
        model: an unmodified ``nn.Module``. Its parameters are re-initialised in place
            and shared with the result; use the result from then on.
        example_inputs: positional arguments of one forward call (tuple or tensor). The
            result accepts calls of the same structure; batch and sequence sizes may vary.
        example_kwargs: keyword arguments of that call.
        hparams: ``HParams`` or a dict of its fields (all default 1).
        **options: ``roles``, ``trainable_norms``, ``reinit``, ``fp8`` (see ``Options``).

    Returns:
        A ``UmupModule`` with the model's parameter names; train it with
        ``umup_fx.AdamW(model, lr=...)`` or ``umup_fx.param_groups``.

    Raises:
        AlreadyTransformedError: ``model`` (or a submodule) was transformed before.
        CaptureError / AnalysisError: the model cannot be captured or analysed.
    """
    _already_transformed(model)
    opts = Options.build(hparams, **options)
    captured = capture(model, example_inputs, example_kwargs)
    original = fx.GraphModule(captured.gm, captured.gm.graph.__deepcopy__())
    plan = run_pipeline(captured.gm, opts, captured.model_name)
    if plan.uncovered:
        listed = "; ".join(f"{op} at {src}" for _, op, src in plan.uncovered)
        warnings.warn(
            f"umup_fx: {len(plan.uncovered)} op(s) of {captured.model_name} have no u-muP rule "
            f"and run unscaled: {listed}. The report (umup_fx.explain) lists them.",
            UncoveredOpWarning,
            stacklevel=2,
        )
    initialise(model, plan, opts.reinit)
    inputs, outputs = _signature(captured.program, captured.gm)
    object.__setattr__(model, _MARK, True)
    return UmupModule(
        model,
        captured.gm,
        original,
        plan,
        inputs,
        outputs,
        _call_shape(example_inputs, example_kwargs),
        captured.program.call_spec.in_spec,
        captured.program.call_spec.out_spec,
        dict(captured.program.constants),
    )
