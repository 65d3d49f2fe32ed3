"""``save_pretrained`` of a transformed Hugging Face model: the plain model, resumable.

The folder is what ``umup_fx.export(model).save_pretrained(...)`` writes (u-muP's
scales folded into the weights, the model's own class and config), so the plain class's
``from_pretrained`` loads the function the transformed model computes. Beside the
weights, in the same ``model.safetensors``, go the transform's settings and, per folded
tensor, its factor and the last-bit corrections (``runtime/saved_state.fold_extras``):
a load into a model transformed the same way (HF Trainer's ``resume_from_checkpoint``,
or ``load_state_dict``) undoes the folding exactly. The plain class reports those keys
as unexpected and ignores them. docs/deploy.md argues the choice.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from umup_fx.errors import CheckpointError
from umup_fx.export import export
from umup_fx.export_scales import ExportError
from umup_fx.runtime import saved_state
from umup_fx.runtime.modules import UmupModule

ONE_FILE = 2**62  # max_shard_size: every tensor and its corrections in one file


def is_hf_model(model: nn.Module) -> bool:
    """A Hugging Face ``PreTrainedModel`` (read by its methods: transformers stays optional)."""
    return all(callable(getattr(type(model), m, None)) for m in ("save_pretrained", "from_pretrained"))


def _check_state_dict(model: nn.Module, unit: dict[str, Any], given: dict[str, Any]) -> None:
    """A ``state_dict`` handed to ``save_pretrained`` must be the model's own values: the
    plain weights are folded from the model, not from it."""
    for key, value in given.items():
        own = unit.get(key)
        if (key != saved_state.EXTRA_STATE and isinstance(value, torch.Tensor)
                and isinstance(own, torch.Tensor)
                and (own.shape != value.shape or not torch.equal(own.cpu(), value.cpu()))):
            raise CheckpointError(
                f"save_pretrained(state_dict=...) of a transformed {type(model).__name__} got "
                f"{key!r} other than the model holds; it writes the plain model folded from "
                "the model's own weights. Load that state dict into the model first "
                "(model.load_state_dict(state_dict)), then save_pretrained(path).")


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, *args: Any,
                    state_dict: dict[str, Any] | None = None, **kwargs: Any) -> None:
    """Write ``model`` (transformed) as its plain class's checkpoint plus what brings the
    transformed model back exactly. Other arguments go to the plain ``save_pretrained``;
    ``max_shard_size`` is always one file.

    Raises:
        ExportError: the plain class cannot express one of the model's scales (then save
            the u-muP state with ``torch.save(model.state_dict(), path)``).
        CheckpointError: ``state_dict`` is not the model's own.
    """
    unit = model.state_dict()
    if state_dict is not None:
        _check_state_dict(model, unit, state_dict)
    try:
        plain = export(model)
    except ExportError as exc:
        raise ExportError(
            f"save_pretrained of a transformed {type(model).__name__} writes the plain model "
            f"(umup_fx.export) so that from_pretrained loads what it computes, and this model "
            f"cannot be exported: {exc} Save its u-muP state instead with "
            "torch.save(model.state_dict(), path) (it carries the transform's settings) and "
            "load it into the model transformed the same way.") from exc
    plain_state = plain.state_dict()
    extras = saved_state.fold_extras(unit, plain_state, saved_state.settings(model))
    kwargs["max_shard_size"] = ONE_FILE  # a shard loads alone (Trainer): keep them together
    plain.save_pretrained(save_directory, *args, state_dict={**plain_state, **extras}, **kwargs)


class UmupPretrainedModel(UmupModule):
    """A transformed Hugging Face model: ``save_pretrained`` writes the plain model."""

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any,
                        **kwargs: Any) -> None:
        """The plain model's folder, which also loads back into this model exactly
        (``umup_fx.hf_save.save_pretrained``; docs/deploy.md)."""
        save_pretrained(self, save_directory, *args, **kwargs)
