"""Module and parameter names through wrappers: activation checkpointing, ``torch.compile``
and FSDP1 put a segment in front of a module's own names; the plan never has them."""

from __future__ import annotations

import re

from torch import nn

# Name segments that wrappers add in front of a module's own names: activation
# checkpointing, torch.compile, FSDP1. Plan names never contain them.
_WRAPPER_SEGMENTS = ("_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module")
_WRAPPER_RE = re.compile(r"(^|\.)(" + "|".join(_WRAPPER_SEGMENTS) + r")(?=\.|$)")


def canonical_name(name: str) -> str:
    """A parameter / module name without wrapper segments (``layers.0._checkpoint_wrapped_
    module.attn`` -> ``layers.0.attn``): the name the plan uses."""
    return _WRAPPER_RE.sub("", name).lstrip(".")


def unwrap(module: nn.Module) -> nn.Module:
    """The module a checkpoint / compile / FSDP1 wrapper holds (the module itself if none)."""
    for attr in _WRAPPER_SEGMENTS:
        inner = module._modules.get(attr)
        if inner is not None:
            return unwrap(inner)
    return module
