"""The optimizer hook (rules §5): u-muP parameter groups and an AdamW that uses them.

Adam's update size does not depend on the gradient's scale, so u-muP sets each
parameter's learning rate directly: ``eta`` times the plan's LR factor (fan-in, fan-out
and depth rules). Weight decay is *independent*: each group's ``weight_decay`` is
``wd / group_lr``, so AdamW's decoupled step ``lr * weight_decay`` equals ``wd`` for
every parameter whatever its LR (scaled by a schedule as the LR is).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import regions
from .errors import UmupError
from .init import plan_of


def param_groups(
    model: nn.Module, lr: float, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """u-muP parameter groups for ``torch.optim.Adam`` / ``AdamW`` (one per LR factor).

    Each group has ``params``, ``lr = lr * factor``, ``weight_decay = weight_decay /
    (lr * factor)`` (independent weight decay), and, for inspection, ``umup_lr_factor``
    and ``names``. Parameters that do not require grad (frozen by you, or u-muP's
    non-parametric norms) are left out.

    Raises:
        UmupError: the model was not transformed, or has a trainable parameter the plan
            does not know (added after ``transform``): u-muP cannot guess its LR rule.
    """
    if not lr > 0:
        raise UmupError(f"lr must be > 0, got {lr!r}.")
    if weight_decay < 0:
        raise UmupError(f"weight_decay must be >= 0, got {weight_decay!r}.")
    plan = plan_of(model)
    groups: dict[float, dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        name = regions.canonical_name(name)  # through checkpoint / compile wrappers
        if name not in plan.params:
            raise UmupError(
                f"Parameter {name!r} is not in the u-muP plan of {plan.model_name} (was it "
                "added after transform?). Transform the finished model, or give this "
                "parameter its own optimizer group."
            )
        factor = plan.params[name].lr_factor
        group = groups.setdefault(
            factor,
            {
                "params": [],
                "names": [],
                "lr": lr * factor,
                "weight_decay": weight_decay / (lr * factor),
                "umup_lr_factor": factor,
            },
        )
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


class AdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` over ``param_groups(model, lr, weight_decay)``.

    ``umup_fx.AdamW(model, lr=2**-3, weight_decay=2**-13, betas=(0.9, 0.999))``; every
    other keyword goes to ``torch.optim.AdamW``.
    """

    def __init__(
        self, model: nn.Module, lr: float = 1e-3, weight_decay: float = 0.0, **kwargs: Any
    ) -> None:
        if not isinstance(model, nn.Module):
            raise UmupError(
                "umup_fx.AdamW takes the transformed model (it reads the u-muP plan), not a "
                "parameter list; for your own groups use umup_fx.param_groups."
            )
        super().__init__(param_groups(model, lr, weight_decay), lr=lr, **kwargs)
