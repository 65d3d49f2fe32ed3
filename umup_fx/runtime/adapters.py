"""Adapters (LoRA / PEFT) and a transformed model: one supported path, the others refused.

Supported (docs/rules.md, "LoRA adapters"): LoRA on linears, added *before* transform,
with ``transform(model, ..., pretrained=True)``: the adapter's add passes through
unscaled (``passes/residuals.py``: a zero adapter leaves the model as it was), no
weight is re-initialised (``lora_B`` stays zero, the frozen base stays as loaded) and
the weights are converted so the model computes what it computed before.

Refused with ``AdapterError``, because each would go wrong without a word:

- *adapters added after transform*: the installed graphs run the captured computation
  and read parameters by path, so an adapter module that PEFT puts in place of a
  linear is never called (the loss ignores it, and backward fails once only adapters
  train). ``guard_tree`` marks a transformed model's modules; a global module
  registration hook then raises when one of them is replaced by anything but a
  wrapper of itself (activation checkpointing, ``torch.compile``) or gains a child
  below the root.
- *transform of a model holding adapters without* ``pretrained=True``: unit init would
  re-initialise ``lora_B`` (a non-zero adapter) and the frozen base weights;
- other PEFT tuners, LoRA on embeddings or convolutions, DoRA: their graphs are not
  the low-rank update the rule recognises; and a ``PeftModel`` itself (export cannot
  capture its wrapper; transform the model it wraps).
- *merging, unloading, disabling or switching adapters of a transformed model*
  (``merge_and_unload``, ``merge_adapter``, ``unload``, ``disable_adapter``,
  ``set_adapter``): the graphs scale the base weight's product and the adapter's by
  u-muP's factors of each and read ``lora_A`` / ``lora_B`` by path, ignoring PEFT's
  flags, so a merge into the unit-scale base weight would add the adapter twice at the
  wrong scale, and a disabled adapter would still run. ``guard_tree`` gives each LoRA
  layer a subclass (``export`` restores the class) whose ``merge``, ``enable_adapters(False)``
  and ``set_adapter`` to another adapter raise before anything changes; unloading is
  refused by the registration hook. The exact route is ``umup_fx.export(peft_model)``
  (a ``PeftModel`` over the plain model, u-muP's scales folded into base and adapter
  weights) and then PEFT's own ``merge_and_unload`` (docs/training.md, "LoRA / PEFT").
"""

from __future__ import annotations

import sys
from typing import Any

from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook

from umup_fx.errors import AdapterError
from umup_fx.runtime.names import unwrap

_MARK = "_umup_tree"  # module.__dict__ key: the transformed model's class name
_hook_installed = False
_GUARDED: dict[type, type] = {}  # a LoRA layer class -> its subclass that refuses merges

SUPPORTED = (
    "Supported: LoRA on linear layers, added before transform, with "
    "umup_fx.transform(peft_model.base_model.model, ..., pretrained=True) (the model inside "
    "the PeftModel); or full fine-tuning of the transformed model. See docs/training.md, "
    "'LoRA / PEFT'."
)


def _tuner_layer_type() -> type | None:
    peft = sys.modules.get("peft")  # only a model built with peft can hold its layers
    if peft is None:
        return None
    from peft.tuners.tuners_utils import BaseTunerLayer

    return BaseTunerLayer


def _qualname(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def refuse_adapters(model: nn.Module, pretrained: bool = False) -> None:
    """Raise ``AdapterError`` unless ``model``'s PEFT adapters (if any) are the supported
    kind (LoRA on ``nn.Linear``, no DoRA) and ``pretrained`` is set; a ``PeftModel``
    always raises (transform the model it wraps)."""
    tuner = _tuner_layer_type()
    if tuner is None:
        return
    from peft import PeftModel
    from peft.tuners.lora.layer import Linear as LoraLinear

    if isinstance(model, PeftModel):
        raise AdapterError(
            f"umup_fx cannot capture the PeftModel wrapper ({type(model).__name__}); "
            "transform the model it wraps, peft_model.base_model.model, with "
            "pretrained=True (the wrapper then runs the transformed model). " + SUPPORTED)
    for name, m in model.named_modules():
        if not isinstance(m, tuner):
            continue
        what = f"its module {name!r} is a PEFT adapter layer ({_qualname(m)})"
        if not isinstance(m, LoraLinear) or not isinstance(m.get_base_layer(), nn.Linear):
            why = "only LoRA on nn.Linear layers is supported (its add is a low-rank update)"
        elif any(getattr(m, "use_dora", {}).values()):
            why = "DoRA rescales the base weight's output, which is not a low-rank update"
        elif not pretrained:
            why = ("without pretrained=True unit init would re-initialise lora_B (the "
                   "adapter would no longer start at zero) and the frozen base weights")
        else:
            continue
        raise AdapterError(
            f"umup_fx cannot transform {type(model).__name__}: {what}; {why}. " + SUPPORTED)


def peft_inner(model: nn.Module) -> nn.Module | None:
    """The model a ``PeftModel`` wraps (``base_model.model``); ``None`` for anything else."""
    if _tuner_layer_type() is None:
        return None
    from peft import PeftModel

    return model.base_model.model if isinstance(model, PeftModel) else None


_ROUTE = (
    "For a merged plain model, export first: merged = umup_fx.export(peft_model)."
    "merge_and_unload() (export returns a PeftModel over the plain model, u-muP's scales "
    "folded into the base and adapter weights, so PEFT's merge is exact there; "
    "umup_fx.export(peft_model).unload() drops the adapters); to train on in u-muP after "
    "merging, transform that model with pretrained=True. See docs/training.md, 'LoRA / PEFT'."
)


def _refuse(layer: nn.Module, what: str, why: str,
            state: str = "Nothing was changed.") -> AdapterError:
    owner = layer.__dict__.get(_MARK, "a transformed model")
    return AdapterError(
        f"PEFT cannot {what} on a model that umup_fx.transform rewrote ({owner}): {why}. "
        f"{state} {_ROUTE}")


class _LoraGuard(nn.Module):
    """Mixin of a transformed model's LoRA layers: PEFT's merge and adapter switches,
    which its installed graphs would not follow, raise before they change anything."""

    def merge(self, *args: Any, **kwargs: Any) -> None:
        raise _refuse(self, "merge adapters (merge_adapter / merge_and_unload)",
                      "the installed graphs scale the base weight's product and the adapter's "
                      "by u-muP's factors of each, and run the adapter whatever PEFT's merged "
                      "flag says, so adding the adapter into the unit-scale base weight would "
                      "count it twice, at the wrong scale")

    def enable_adapters(self, enabled: bool) -> None:
        if not enabled:
            raise _refuse(self, "disable adapters (disable_adapter / disable_adapter_layers)",
                          "the installed graphs run the adapters they captured whatever PEFT's "
                          "flags say, so the adapters would still run")
        super().enable_adapters(enabled)  # type: ignore[misc]

    def set_adapter(self, adapter_names: Any, *args: Any, **kwargs: Any) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        active = list(self.active_adapters)  # type: ignore[attr-defined]
        if names != active:
            raise _refuse(self, f"switch the active adapters to {names}",
                          f"the installed graphs run the adapters active at transform "
                          f"({active}) whatever PEFT's flags say",
                          "No layer was changed (PeftModel.set_adapter relabels its "
                          "active_adapter first: set_adapter back to "
                          f"{active[0] if len(active) == 1 else active!r} to match).")
        super().set_adapter(adapter_names, *args, **kwargs)  # type: ignore[misc]


def _guard_lora(module: nn.Module) -> None:
    cls = type(module)
    if cls not in _GUARDED:
        _GUARDED[cls] = type(f"Umup{cls.__name__}", (_LoraGuard, cls), {"__module__": cls.__module__})
    module.__class__ = _GUARDED[cls]


def unguard(module: nn.Module) -> None:
    """Give a LoRA layer of a transformed model its own class back (``export``'s copy)."""
    if isinstance(module, _LoraGuard):
        module.__class__ = next(c for c in type(module).__mro__
                                if c in _GUARDED and not issubclass(c, _LoraGuard))


def guard_tree(model: nn.Module) -> None:
    """Mark every module of a transformed ``model``: replacing one is then an ``AdapterError``,
    and so are merging, disabling and switching its LoRA adapters."""
    _install_hook()
    name = type(model).__name__
    tuner = _tuner_layer_type()
    for module in model.modules():
        module.__dict__[_MARK] = name
        if tuner is not None and isinstance(module, tuner) and not isinstance(module, _LoraGuard):
            _guard_lora(module)


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
    elif isinstance(old, _LoraGuard) and child is old.get_base_layer():  # type: ignore[attr-defined]
        raise _refuse(old, "unload adapters (unload / merge_and_unload)",
                      f"the installed graphs read {name!r}'s adapter weights by path, and "
                      "they would be gone")
    else:
        what = f"submodule {name!r} was replaced by a {_qualname(child)}"
        is_peft = type(child).__module__.split(".")[0] == "peft"
        if child is not None and not is_peft and any(m is old for m in child.modules()):
            raise AdapterError(
                f"{type(parent).__name__} belongs to a model that umup_fx.transform rewrote "
                f"({owner}), and {what} that wraps it. A wrapper module of your own is "
                "understood when it is there before transform (the block is then called "
                "through it); after transform, wrap blocks with torch's checkpoint_wrapper / "
                "apply_activation_checkpointing or torch.compile, which umup_fx reads "
                "through, or transform the model with the wrapper in place."
            )
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
