"""The optimizer hook (rules §5): u-muP parameter groups and an AdamW that uses them.

Adam's update size does not depend on the gradient's scale, so u-muP sets each
parameter's learning rate directly: ``eta`` times the plan's LR factor (fan-in, fan-out
and depth rules). Weight decay is *independent*: each group's ``weight_decay`` is
``wd / group_lr``, so AdamW's decoupled step ``lr * weight_decay`` equals ``wd`` for
every parameter whatever its LR (scaled by a schedule as the LR is).

A model compiled with ``backend="umup"`` has no plan until its first compiled call,
yet training scripts build the optimizer first. Groups made before then are *pending*:
one per parameter, each filled in by the backend at the first compile
(``resolve_pending_groups``); ``umup_fx.AdamW`` merges them by factor at its first
step, and any optimizer that steps on a group still pending raises ``UmupError``.

The default ``eta`` (``DEFAULT_LR``) is the best one the project's own sweeps found
(docs/transfer.md: the example Llama at widths 64-512, 2 seeds): 2^0 for u-muP, which
sits in the 2^0-2^2 range the paper sweeps with every alpha at 1 (rules §6); 2^-9
for the baselines, whose Adam rates are of the usual size.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from umup_fx.errors import UmupError
from umup_fx.runtime.clip import warn_if_always_clipped
from umup_fx.runtime.init import plan_of
from umup_fx.runtime.names import canonical_name

# eta when none is given, per parametrization: the project's sweeps (docs/transfer.md).
DEFAULT_LR: dict[str, float] = {"umup": 2.0**0, "mup": 2.0**-9, "sp": 2.0**-9, "sp_emb_lr": 2.0**-9}
_PENDING = "_umup_pending_groups"  # parameter attribute: its pending group dicts
# transform marks every parameter with its model's parametrization (export removes it)
_TRANSFORMED_ATTR = "_umup_transformed"
_hook_installed = False


class ForeignOptimizerWarning(UserWarning):
    """An optimizer not built from umup_fx's parameter groups steps on a u-muP model."""


def _group(params: list, names: list, lr: float, weight_decay: float, factor: float,
           independent: bool = True) -> dict:
    return {
        "params": params,
        "names": names,
        "lr": lr * factor,
        # u-muP's independent decay (rules §5); baselines keep AdamW's lr-coupled decay.
        "weight_decay": weight_decay / (lr * factor) if independent else weight_decay,
        "umup_lr_factor": factor,
        "umup_base": (lr, weight_decay),
    }


def _check_args(lr: float, weight_decay: float) -> None:
    if not lr > 0:
        raise UmupError(f"lr must be > 0, got {lr!r}.")
    if weight_decay < 0:
        raise UmupError(f"weight_decay must be >= 0, got {weight_decay!r}.")


def param_groups(
    model: nn.Module, lr: float | None = None, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """u-muP parameter groups for ``torch.optim.Adam`` / ``AdamW`` (one per LR factor).

    ``lr`` is eta; by default ``DEFAULT_LR`` of the model's parametrization (2^0 for
    u-muP). Each group has ``params``, ``lr = lr * factor``, ``weight_decay = weight_decay /
    (lr * factor)`` (independent weight decay), and, for inspection, ``umup_lr_factor``
    and ``names``. Parameters that do not require grad (frozen by you, or u-muP's
    non-parametric norms) are left out. Names are matched through checkpoint and
    compile wrappers. A model to be compiled with ``backend="umup"`` that has not run
    yet gets pending groups (see the module docstring).

    Raises:
        UmupError: a trainable parameter the plan does not know (added after
            ``transform``): u-muP cannot guess its LR rule.
    """
    install_step_check()
    try:
        plan = plan_of(model)
    except UmupError:
        lr = DEFAULT_LR["umup"] if lr is None else lr  # only u-muP compiles with the backend
        _check_args(lr, weight_decay)
        return _pending_groups(model, lr, weight_decay)
    lr = DEFAULT_LR[plan.parametrization] if lr is None else lr
    _check_args(lr, weight_decay)
    groups: dict[float, dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        name = canonical_name(name)
        if name not in plan.params:
            raise UmupError(
                f"Parameter {name!r} is not in the u-muP plan of {plan.model_name} (was it "
                "added after transform?). Transform the finished model, or give this "
                "parameter its own optimizer group."
            )
        factor = plan.params[name].lr_factor
        independent = plan.parametrization == "umup"
        group = groups.setdefault(factor, _group([], [], lr, weight_decay, factor, independent))
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


def _pending_groups(model: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    groups = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        group = _group([param], [canonical_name(name)], lr, weight_decay, 1.0)
        group["umup_lr_factor"] = None  # filled in at the first compile
        pending = getattr(param, _PENDING, None)
        if pending is None:
            pending = []
            setattr(param, _PENDING, pending)
        pending.append(group)
        groups.append(group)
    return groups


def resolve_pending_groups(param: torch.Tensor, factor: float) -> None:
    """Give every pending group of ``param`` its u-muP LR (the backend calls this)."""
    for group in getattr(param, _PENDING, []):
        if "initial_lr" in group:
            raise UmupError(
                "An LR scheduler was created before the first compiled call, when the "
                "u-muP learning rates were not known yet. Create it after the first "
                "step, or call umup_fx.prepare(model, example_inputs) before building "
                "the optimizer."
            )
        lr, weight_decay = group["umup_base"]
        group.update(_group(group["params"], group["names"], lr, weight_decay, factor))
    if hasattr(param, _PENDING):
        delattr(param, _PENDING)


def _needs_groups(param: torch.Tensor) -> bool:
    """Whether ``param`` belongs to a model whose LRs differ by parameter (not plain SP)."""
    return getattr(param, _TRANSFORMED_ATTR, None) not in (None, False, "sp")


def _foreign_groups(optimizer: torch.optim.Optimizer) -> list[dict]:
    """The groups not built by ``param_groups`` that hold a transformed model's parameters,
    worked out once per optimizer (again if its groups change)."""
    groups = optimizer.param_groups
    cached = optimizer.__dict__.get("_umup_foreign")
    if cached is None or cached[0] != len(groups):
        found = [i for i, g in enumerate(groups)
                 if "umup_base" not in g and any(_needs_groups(p) for p in g["params"])]
        cached = (len(groups), found)
        optimizer.__dict__["_umup_foreign"] = cached
    return [groups[i] for i in cached[1]]


def _warn_foreign(optimizer: torch.optim.Optimizer, foreign: list[dict]) -> None:
    if optimizer.__dict__.get("_umup_foreign_warned"):
        return
    optimizer.__dict__["_umup_foreign_warned"] = True
    lrs = sorted({g.get("lr") for g in foreign}, key=str)
    n = sum(len(g["params"]) for g in foreign)
    warnings.warn(
        f"umup_fx: {type(optimizer).__name__} steps on {n} parameters of a u-muP model "
        f"without u-muP's parameter groups: each gets its group's learning rate "
        f"({', '.join(f'{lr:g}' if isinstance(lr, float) else str(lr) for lr in lrs)}), "
        "where u-muP sets every parameter's own from its fan-in, fan-out and depth around "
        "eta ~ 2^0 (rules §5); the model then trains with standard-parametrisation "
        "learning rates on unit-scale weights, slowly or not at all. Build the optimizer "
        "with umup_fx.AdamW(model, lr=1.0), or from umup_fx.param_groups(model, lr=1.0) "
        "(torch.optim.AdamW(umup_fx.param_groups(model, lr=1.0))); with HF Trainer, pass "
        "Trainer(..., optimizers=(umup_fx.AdamW(model, lr=1.0), None)) (docs/training.md, "
        "'HF Trainer').",
        ForeignOptimizerWarning,
        stacklevel=3,
    )


def install_step_check() -> None:
    """One global optimizer step pre-hook (``param_groups`` and ``transform`` install it).

    An optimizer stepping on a pending group, or applying u-muP's weight decay as a
    coupled L2 penalty, is an error, not a wrong update; one whose groups were not built
    by ``param_groups`` but hold a transformed model's parameters is a
    ``ForeignOptimizerWarning`` (once per optimizer); and for either, gradients clipped
    on every one of the first steps are an ``AlwaysClippedWarning`` (``runtime/clip.py``).
    Other optimizers cost one cached lookup per step.
    """
    global _hook_installed
    if _hook_installed:
        return

    def check(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        ours = any("umup_base" in group for group in optimizer.param_groups)
        foreign = _foreign_groups(optimizer)
        if foreign:
            _warn_foreign(optimizer, foreign)
        if ours or foreign:
            warn_if_always_clipped(optimizer)
        if not ours:
            return
        for group in optimizer.param_groups:
            if (
                "umup_base" in group
                and group.get("weight_decay", 0) > 0
                and not isinstance(optimizer, torch.optim.AdamW)
                and not group.get("decoupled_weight_decay", False)
            ):
                raise UmupError(
                    f"{type(optimizer).__name__} applies weight_decay as an L2 term in the "
                    "gradient, but u-muP's groups set weight_decay = wd / lr for decoupled "
                    "decay (lr * weight_decay = wd). Use torch.optim.AdamW (or umup_fx.AdamW), "
                    "Adam(decoupled_weight_decay=True), or weight_decay=0."
                )
            if group.get("umup_lr_factor", 0) is None:
                raise UmupError(
                    f"The optimizer steps on {group['names'][0]!r} before its u-muP "
                    "learning rate is known: the model was neither transformed nor run "
                    "once under torch.compile(model, backend='umup'). Run the compiled "
                    "model's forward before the first step."
                )

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    register_optimizer_step_pre_hook(check)
    _hook_installed = True


class AdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` over ``param_groups(model, lr, weight_decay)``.

    ``umup_fx.AdamW(model, weight_decay=2**-13)``: ``lr`` (eta) defaults to
    ``DEFAULT_LR`` of the model's parametrization (2^0 for u-muP; each group's rate is
    eta times its factor, printed in the plan's LR column); every other keyword goes to
    ``torch.optim.AdamW``. Built before a ``backend="umup"``
    model's first call, its groups are resolved then and merged at its first step.
    """

    def __init__(
        self, model: nn.Module, lr: float | None = None, weight_decay: float = 0.0,
        **kwargs: Any
    ) -> None:
        if not isinstance(model, nn.Module):
            raise UmupError(
                "umup_fx.AdamW takes the transformed model (it reads the u-muP plan), not a "
                "parameter list; for your own groups use umup_fx.param_groups."
            )
        groups = param_groups(model, lr, weight_decay)
        super().__init__(groups, lr=groups[0]["umup_base"][0] if groups else 1.0, **kwargs)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        if len(self.param_groups) > 1 and all(
            len(g["params"]) == 1 and g.get("umup_lr_factor") is not None
            for g in self.param_groups
        ) and not self.state:
            self._merge_groups()
        return super().step(closure)

    def _merge_groups(self) -> None:
        """One group per LR factor (foreach kernels run per group)."""
        merged: dict[float, dict[str, Any]] = {}
        for g in self.param_groups:
            key = g["umup_lr_factor"]
            if key not in merged:
                merged[key] = {**g, "params": [], "names": []}
            merged[key]["params"] += g["params"]
            merged[key]["names"] += g["names"]
        self.param_groups[:] = list(merged.values())
