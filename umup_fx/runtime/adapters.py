"""Adapters (LoRA / PEFT) and a transformed model: refused both ways, never ignored.

Not supported yet (docs/rules.md, "LoRA adapters"), and each way round would go wrong
without a word:

- *adapters added after transform*: the installed graphs run the captured computation
  and read parameters by path, so an adapter module that PEFT puts in place of a
  linear is never called (the loss ignores it, and backward fails once only adapters
  train). ``guard_tree`` marks a transformed model's modules; a global module
  registration hook then raises ``AdapterError`` when one of them is replaced by
  anything but a wrapper of itself (activation checkpointing, ``torch.compile``) or
  gains a child below the root.
- *transform of a model holding adapters*: the adapter's ``base + scale * B(A(x))``
  would become a unit-scaled plain add (a zero adapter would change the function) and
  unit init would re-initialise ``lora_B`` and the frozen base weights.
  ``refuse_adapters`` raises before anything is touched.
"""

from __future__ import annotations

import sys

from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook

from umup_fx.errors import AdapterError
from umup_fx.runtime.names import unwrap

_MARK = "_umup_tree"  # module.__dict__ key: the transformed model's class name
_hook_installed = False

SUPPORTED = (
    "Supported today: full fine-tuning of the transformed model (umup_fx.AdamW; freeze "
    "parameters with requires_grad_(False) before building the optimizer), or LoRA on the "
    "untransformed model; merge adapters into the base (peft's merge_and_unload()) before "
    "umup_fx.transform. See docs/training.md, 'LoRA / PEFT'."
)


def _tuner_layer_type() -> type | None:
    peft = sys.modules.get("peft")  # only a model built with peft can hold its layers
    if peft is None:
        return None
    from peft.tuners.tuners_utils import BaseTunerLayer

    return BaseTunerLayer


def _qualname(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def refuse_adapters(model: nn.Module) -> None:
    """Raise ``AdapterError`` if ``model`` is a PEFT model or holds PEFT adapter layers."""
    tuner = _tuner_layer_type()
    if tuner is None:
        return
    from peft import PeftModel

    if isinstance(model, PeftModel):
        where = "it is a PeftModel"
    else:
        hit = next((name for name, m in model.named_modules() if isinstance(m, tuner)), None)
        if hit is None:
            return
        where = f"its module {hit!r} is a PEFT adapter layer ({_qualname(model.get_submodule(hit))})"
    raise AdapterError(
        f"umup_fx cannot transform {type(model).__name__}: {where}. u-muP would scale the "
        "adapter's add as a plain add (a zero adapter would change the model) and "
        "re-initialise lora_B and the frozen base weights. " + SUPPORTED
    )


def guard_tree(model: nn.Module) -> None:
    """Mark every module of a transformed ``model``: replacing one is then an ``AdapterError``."""
    _install_hook()
    name = type(model).__name__
    for module in model.modules():
        module.__dict__[_MARK] = name


def _check_registration(parent: nn.Module, name: str, child: nn.Module | None) -> None:
    owner = parent.__dict__.get(_MARK)
    if owner is None:
        return
    old = parent._modules.get(name)
    if old is None:
        if getattr(parent, "umup_plan", None) is not None:
            return  # a new head on the root: the graph does not read it, your code calls it
        what = f"a new submodule {name!r} ({_qualname(child)}) was added"
    elif child is old or (child is not None and unwrap(child) is unwrap(old)):
        return  # a checkpoint / compile wrapper of the same module
    else:
        what = f"submodule {name!r} was replaced by a {_qualname(child)}"
    raise AdapterError(
        f"{type(parent).__name__} belongs to a model that umup_fx.transform rewrote "
        f"({owner}), and {what}. The rewritten graphs were captured before it and read "
        "parameters by path: the new module would never be called (LoRA / PEFT adapters "
        "added after transform are ignored). " + SUPPORTED
    )


def _install_hook() -> None:
    global _hook_installed
    if _hook_installed:
        return

    def hook(parent: nn.Module, name: str, child: nn.Module | None) -> None:
        _check_registration(parent, name, child)

    register_module_module_registration_hook(hook)
    _hook_installed = True
