"""Gradient clipping under u-muP (docs/rules.md, "Gradient clipping"): a threshold on the RMS.

u-muP's gradients are unit scale: every element of every weight's gradient has RMS
about 1 at init, so a model's global gradient norm is about ``sqrt(n)`` for ``n``
gradient elements (hundreds for a toy model, tens of thousands for a 1B one), where a
standard-parametrised model's is about 1. A global-norm threshold such as HF
Trainer's ``max_grad_norm=1.0`` then clips every step, by a factor that grows with the
model. These helpers state the threshold as the gradient's *RMS*, which unit scaling
keeps near 1 at every width:

- ``clip_grad_norm_(params, max_rms)``: ``torch.nn.utils.clip_grad_norm_`` at
  ``max_rms * sqrt(n)``; returns the RMS before clipping.
- ``max_grad_norm(model, max_rms)``: that global-norm threshold, for code that clips
  by global norm itself (``TrainingArguments(max_grad_norm=...)``).
- ``SpikeClipper(factor)``: clips only spikes, at ``factor`` times a running average
  of the RMS. Adam's step does not depend on the gradient's scale, so what clipping
  protects an Adam run from is a step whose gradient is far larger than usual.

``warn_if_always_clipped`` (called by the optimizer hook of ``runtime/optim.py`` for any
optimizer stepping on a transformed model's parameters, umup_fx's or not) warns once
when the first steps' gradients all have the same global norm: something clipped every
one of them (torch's ``clip_grad_norm_``, Trainer's ``max_grad_norm``, anything), which
under u-muP usually means an SP threshold. Equal norms, not a threshold, because the
hook cannot know the threshold, and a clipped gradient's norm is the threshold.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from umup_fx.errors import UmupError

__all__ = ["AlwaysClippedWarning", "SpikeClipper", "clip_grad_norm_", "max_grad_norm"]

Params = nn.Module | torch.Tensor | Iterable[torch.Tensor]


class AlwaysClippedWarning(UserWarning):
    """Every one of the first optimizer steps had its gradients clipped."""


def _with_grads(parameters: Params) -> list[torch.Tensor]:
    if isinstance(parameters, nn.Module):
        parameters = parameters.parameters()
    elif isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    return [p for p in parameters if p.grad is not None]


def _numel(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() for t in tensors)  # a DTensor's numel is the global one


def _check_threshold(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise UmupError(f"{name} must be a finite number > 0, got {value!r}.")


def max_grad_norm(model: Params, max_rms: float = 1.0) -> float:
    """The global gradient-norm threshold that means "gradient RMS ``max_rms``".

    ``max_rms * sqrt(n)``, with ``n`` the elements of the parameters that require
    grad (those a clipper sees gradients of). For code that clips by global norm:
    ``TrainingArguments(max_grad_norm=umup_fx.max_grad_norm(model, 1.0))`` or
    ``torch.nn.utils.clip_grad_norm_(model.parameters(), that)``.
    """
    _check_threshold("max_rms", max_rms)
    params = model.parameters() if isinstance(model, nn.Module) else model
    n = _numel(p for p in params if p.requires_grad)
    if n == 0:
        raise UmupError("max_grad_norm: no parameter requires grad, so nothing would be clipped.")
    return max_rms * math.sqrt(n)


def grad_rms(parameters: Params) -> torch.Tensor:
    """The RMS of all gradients together: global norm / sqrt(elements). About 1 at u-muP init."""
    grads = [p.grad for p in _with_grads(parameters)]
    if not grads:
        return torch.tensor(0.0)
    norm = torch.nn.utils.get_total_norm(grads)
    return _local(norm) / math.sqrt(_numel(grads))


def _total_norm(grads: list[torch.Tensor]) -> float:
    """The global 2-norm of ``grads``, plain tensors and DTensors of any mesh mixed (tensor
    parallel shards some weights and leaves others plain, which torch's norm refuses)."""
    return math.sqrt(sum(float(_local(torch.linalg.vector_norm(g.detach()))) ** 2 for g in grads))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # DTensor (FSDP2) -> tensor


def clip_grad_norm_(
    parameters: Params, max_rms: float, *, error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> torch.Tensor:
    """Scale the gradients down so their RMS (all of them together) is at most ``max_rms``.

    The same clip as ``torch.nn.utils.clip_grad_norm_(params, max_rms * sqrt(n))``
    (one factor for every gradient, so the update's direction is kept), with ``n`` the
    gradient elements; the threshold means the same at every width. Unit-scale
    gradients have RMS of order 1. Works on FSDP2 (DTensor) gradients as torch's does.

    Args:
        parameters: a model, a tensor or an iterable of tensors (those with a grad count).
        max_rms: the largest gradient RMS let through.

    Returns:
        The RMS before clipping (log it to choose ``max_rms``).
    """
    _check_threshold("max_rms", max_rms)
    params = _with_grads(parameters)
    if not params:
        return torch.tensor(0.0)
    root_n = math.sqrt(_numel(p.grad for p in params))
    norm = torch.nn.utils.clip_grad_norm_(
        params, max_rms * root_n, error_if_nonfinite=error_if_nonfinite, foreach=foreach)
    return _local(norm) / root_n


class SpikeClipper:
    """Clip a step's gradients only when their RMS spikes above ``factor`` x its running mean.

    ``clipper = SpikeClipper(factor=4.0)``; after ``backward``, ``clipper(model)``
    (returns the RMS before clipping). The running mean is an exponential average
    (``beta``) of the RMS actually applied, seeded by the first ``warmup`` steps, which
    are not clipped. Nothing leaves the device (no ``.item()``). Save it with
    ``state_dict()`` next to the optimizer's.
    """

    def __init__(self, factor: float = 4.0, beta: float = 0.98, warmup: int = 10) -> None:
        _check_threshold("factor", factor)
        if not 0.0 <= beta < 1.0:
            raise UmupError(f"beta must be in [0, 1), got {beta!r}.")
        if warmup < 1:
            raise UmupError(f"warmup must be >= 1 step, got {warmup!r}.")
        self.factor, self.beta, self.warmup = factor, beta, warmup
        self.steps = 0
        self.mean: torch.Tensor | None = None

    @torch.no_grad()
    def __call__(self, parameters: Params) -> torch.Tensor:
        params = _with_grads(parameters)
        rms = grad_rms(params)
        if not params:
            return rms
        if self.mean is None:
            self.mean = torch.zeros((), dtype=torch.float32, device=rms.device)
        self.steps += 1
        if self.steps <= self.warmup:  # seed the mean with a plain average
            self.mean.add_((rms.float() - self.mean) / self.steps)
            return rms
        limit = self.factor * self.mean
        coef = torch.clamp(limit / (rms.float() + 1e-12), max=1.0)
        torch._foreach_mul_([p.grad for p in params], coef.to(params[0].grad.dtype))
        self.mean.mul_(self.beta).add_((1 - self.beta) * torch.minimum(rms.float(), limit))
        return rms

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "mean": None if self.mean is None else self.mean.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps, self.mean = state["steps"], state["mean"]


_CHECKED_STEPS = 3  # the optimizer steps whose gradient norms are compared
_RTOL = 1e-4  # equal norms, to this relative tolerance, mean "clipped to one threshold"


def warn_if_always_clipped(optimizer: torch.optim.Optimizer) -> None:
    """Warn once if the first ``_CHECKED_STEPS`` steps' gradients share one global norm.

    Unclipped gradients never have equal norms on successive steps; gradients that
    ``clip_grad_norm_`` clipped all have the threshold's. Reads the norm on those first
    steps only (one reduction each), then nothing.
    """
    seen = optimizer.__dict__.setdefault("_umup_clip_norms", [])
    if len(seen) > _CHECKED_STEPS:
        return
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if not grads:
        return
    seen.append(_total_norm(grads))
    if len(seen) < _CHECKED_STEPS:
        return
    norms = seen[:_CHECKED_STEPS]
    seen.append(None)  # done: never look again
    if max(norms) - min(norms) > _RTOL * max(norms) or not norms[0] > 0:
        return
    n = _numel(grads)
    warnings.warn(
        f"umup_fx: the gradients of the first {_CHECKED_STEPS} optimizer steps all had global "
        f"norm {norms[0]:.4g}: something clips every step (HF Trainer's max_grad_norm=1.0 does). "
        f"u-muP gradients are unit scale (RMS of order 1, global norm ~sqrt({n}) = {math.sqrt(n):.0f} "
        f"here), so this threshold means gradient RMS {norms[0] / math.sqrt(n):.2g} and turns "
        "clipping into a rescale of every step. Clip by RMS instead: "
        "umup_fx.clip_grad_norm_(model, max_rms), or max_grad_norm=umup_fx.max_grad_norm(model, "
        "max_rms) for Trainer, or SpikeClipper (docs/training.md, 'Clipping').",
        AlwaysClippedWarning,
        stacklevel=3,
    )
