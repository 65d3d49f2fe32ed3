"""Unit initialisation (rules §2), read from the plan: the one place weights are reset."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from umup_fx.errors import UmupError
from umup_fx.runtime.names import canonical_name, unwrap

if TYPE_CHECKING:
    from umup_fx.plan import Plan  # the compiler's data; read here, never built


def plan_of(model: nn.Module) -> Plan:
    """The u-muP plan a transformed (or prepared) model carries, through wrappers."""
    for module in (model, unwrap(model)):
        plan = getattr(module, "umup_plan", None)
        if plan is not None:
            return plan
    raise UmupError(
        f"{type(model).__name__} carries no u-muP plan. Pass the model that "
        "umup_fx.transform rewrote (or that umup_fx.prepare readied), or a wrapper of it."
    )


@torch.no_grad()
def unit_init(model: nn.Module, plan: Plan, generator: torch.Generator | None = None) -> None:
    """Weights N(0, 1), biases 0, norm gains 1 (shifts 0); freeze non-parametric norms.

    Works on plain tensors and on FSDP2 DTensor shards (each rank fills its shard).
    Uses the global RNG unless ``generator`` is given (seed it for reproducible init).
    """
    extra = {} if generator is None else {"generator": generator}
    for name, tensor in model.named_parameters():
        p = plan.params.get(canonical_name(name))
        if p is None:
            continue
        if p.init == "normal":
            tensor.normal_(0.0, p.init_std or 1.0, **extra)
        elif p.init == "zeros":
            tensor.zero_()
        elif p.init == "ones":
            tensor.fill_(1.0)
        if p.frozen_by_umup:
            tensor.requires_grad_(False)


def initialise(model: nn.Module, plan: Plan, reinit: bool = True) -> None:
    """``unit_init`` (``reinit``), or only freeze the non-parametric norms (weights are
    loaded afterwards). Weights on ``meta`` are left alone: ``init_`` after ``to_empty``."""
    if reinit and not any(p.is_meta for p in model.parameters()):
        unit_init(model, plan)
        return
    for name, tensor in model.named_parameters():
        p = plan.params.get(canonical_name(name))
        if p is not None and p.frozen_by_umup:
            tensor.requires_grad_(False)


def init_(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Apply u-muP unit initialisation to ``model`` in place, from its plan; returns it.

    The step of its own that a meta-device recipe needs: ``transform`` on ``meta``,
    ``fully_shard``, ``to_empty(device=...)``, then ``init_`` (deterministic under
    ``torch.manual_seed``). Tensor constants of the rewritten graphs are restored;
    the model's own buffers are its business (recompute RoPE tables as your
    ``init_weights`` would).
    """
    unit_init(model, plan_of(model), generator)
    with torch.no_grad():  # tensor constants the graphs keep as buffers: to_empty voids them
        for module in model.modules():
            for _, region, names in module.__dict__.get("_umup_graphs", []):
                for name, buffer in names.items():
                    getattr(module, buffer).copy_(region.constants[name])
    return model
