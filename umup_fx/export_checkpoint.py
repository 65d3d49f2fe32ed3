"""Export a u-muP DCP checkpoint to a plain one, tensor by tensor.

``export_checkpoint(model, checkpoint, out)`` takes the transformed model (its weights
may be on ``meta``: only its graphs are read), finds the factors ``umup_fx.export``
folds (``export_scales.solve_folding``) and then, for one tensor at a time, loads it from
the torch.distributed.checkpoint (DCP) directory, multiplies it and writes it as its own
safetensors shard, with Hugging Face's ``model.safetensors.index.json`` (and the model's
config, for a Hugging Face model). Peak memory is about the largest tensor, twice (the
loaded one and the written copy), beyond the process itself: never a copy of the model.
The checkpoint's own settings (the root's ``_extra_state``: reference sizes, hparams,
options; ``runtime/saved_state.py``) must be the model's transform's, else
``CheckpointError``; ``python -m umup_fx export`` is the command line for it, and
transforms the model as those settings say.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from umup_fx.errors import CheckpointError, UmupError
from umup_fx.export import _aliases, _untie_config
from umup_fx.export_scales import ExportError, solve_folding
from umup_fx.runtime import saved_state
from umup_fx.runtime.names import canonical_name
from umup_fx.runtime.saved_state import EXTRA_STATE


def _targets(model: nn.Module) -> dict[str, list[tuple[str, float | None]]]:
    """Canonical parameter -> [(name to write, factor or None for "its frozen value")]."""
    folding = solve_folding(model)
    aliases = _aliases(model)
    out: dict[str, list[tuple[str, float | None]]] = {}
    for name, uses in folding.factors.items():
        distinct: list[tuple[float, str]] = []
        for f, _, owner in uses:
            if not any(math.isclose(f, g, rel_tol=1e-9) for g, _ in distinct):
                distinct.append((f, owner))
        names = aliases.get(name, [name])
        if len(distinct) == 1:
            out[name] = [(name, distinct[0][0])]
            continue
        if len(distinct) > len(names):
            raise ExportError(f"parameter {name!r} needs {len(distinct)} different scales "
                              "and has one name: it cannot be exported")
        placed: list[tuple[str, float | None]] = []
        for f, owner in distinct:
            free = [n for n in names if n not in {p for p, _ in placed}]
            match = [n for n in free if n.rpartition(".")[0] == owner or n.startswith(owner + ".")]
            placed.append(((match or free)[0], f))
        out[name] = placed
    for name in folding.frozen:
        out[name] = [(name, None)]
    return out


def _model_keys(stored: dict[str, Any], params: list[str]) -> dict[str, str]:
    """Canonical model name -> its key in the checkpoint. A training checkpoint often
    nests the model's state dict under a key (``{"model": ..., "optim": ...}``, stored as
    ``model.<name>``): the prefix is the one under which the most parameters are stored
    (none when the model's state dict was saved alone). Other keys (optimizer state) are
    not the model's and are never read."""
    tensors = {canonical_name(k): k for k, md in stored.items() if hasattr(md, "size")}
    if not params:
        return tensors
    first = params[0]
    prefixes = {""} | {k[: len(k) - len(first)] for k in tensors
                       if k.endswith("." + first)}
    found = {p: sum(p + n in tensors for n in params) for p in prefixes}
    prefix = max(sorted(found), key=lambda p: found[p])
    return {k[len(prefix):]: key for k, key in tensors.items() if k.startswith(prefix)}


def read_settings(checkpoint: str | Path) -> dict[str, Any] | None:
    """The transform's settings a u-muP DCP checkpoint carries (its root's
    ``_extra_state``, the shortest such key that holds them: a training checkpoint nests
    the model's under a prefix), or None for one saved before umup_fx kept them."""
    import torch.distributed.checkpoint as dcp

    reader = dcp.FileSystemReader(str(checkpoint))
    stored = reader.read_metadata().state_dict_metadata
    keys = sorted((k for k, md in stored.items() if k.rpartition(".")[2] == EXTRA_STATE
                   and getattr(getattr(md, "properties", None), "dtype", None) == torch.uint8),
                  key=len)
    for key in keys:
        tensor = torch.empty(stored[key].size, dtype=torch.uint8)
        dcp.load({key: tensor}, storage_reader=reader)
        try:
            return saved_state.decode(tensor)
        except CheckpointError:
            continue  # another module's extra state
    return None


def check_settings(model: nn.Module, saved: dict[str, Any] | None) -> None:
    """Refuse a checkpoint saved from another transform than ``model``'s."""
    differ = saved_state.mismatch(saved, saved_state.settings(model)) if saved else []
    if differ:
        raise CheckpointError(
            f"the checkpoint was saved from a model transformed with other settings than "
            f"this {type(model).__name__} ({'; '.join(differ)}): its factors would be "
            "folded at the wrong scales. Transform the model as the checkpoint's was "
            "(python -m umup_fx export does: it reads them from the checkpoint).")


def export_checkpoint(model: nn.Module, checkpoint: str | Path, out: str | Path) -> dict[str, Any]:
    """Write the plain checkpoint of the u-muP DCP ``checkpoint`` of transformed ``model``
    to ``out`` (safetensors shards + index; config for HF models). Returns the index.

    Raises:
        CheckpointError: the checkpoint carries settings (reference sizes, hparams,
            options) other than ``model``'s transform.
    """
    import torch.distributed.checkpoint as dcp
    try:
        from safetensors.torch import save_file
    except ImportError as exc:
        raise UmupError(
            "Writing a plain checkpoint needs safetensors: pip install 'umup_fx[export]' "
            "(or pip install safetensors)."
        ) from exc

    check_settings(model, read_settings(checkpoint))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    reader = dcp.FileSystemReader(str(checkpoint))
    stored = reader.read_metadata().state_dict_metadata
    folding = solve_folding(model)
    targets = _targets(model)
    aliases = _aliases(model)
    params = {canonical_name(n) for n, _ in model.named_parameters(remove_duplicate=False)}
    by_canonical = _model_keys(stored, sorted(params))
    jobs: list[tuple[str, str | None, float | None, Any]] = []  # (out name, key, factor, meta)
    for name in sorted(params & set(aliases)):
        key = next((by_canonical[a] for a in aliases[name] if a in by_canonical), None)
        for write_as, factor in targets.get(name, [(name, 1.0)]):
            if key is None and factor is not None:
                raise ExportError(f"the checkpoint has no tensor for parameter {name!r}")
            jobs.append((write_as, key, factor, stored.get(key) if key else None))
    buffers = {canonical_name(n) for n in model.state_dict()} - params - {EXTRA_STATE}
    for name in sorted(buffers & set(by_canonical)):  # persistent buffers, as saved
        jobs.append((name, by_canonical[name], 1.0, stored[by_canonical[name]]))
    weight_map: dict[str, str] = {}
    total = 0
    for i, (write_as, key, factor, md) in enumerate(jobs):
        if factor is None:  # a norm parameter u-muP froze: its neutral value
            shape = dict(model.named_parameters())[write_as].shape
            tensor = torch.full(shape, folding.frozen[write_as])
        else:
            tensor = torch.empty(md.size, dtype=md.properties.dtype)
            dcp.load({key: tensor}, storage_reader=reader)
            if factor != 1.0:
                tensor.mul_(factor)
        shard = f"model-{i + 1:05d}-of-{len(jobs):05d}.safetensors"
        save_file({write_as: tensor.contiguous()}, str(out / shard), metadata={"format": "pt"})
        weight_map[write_as] = shard
        total += tensor.numel() * tensor.element_size()
        del tensor
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "save_pretrained"):
        holder = nn.Module()
        holder.config = copy.deepcopy(config)
        if any(len(t) > 1 for t in targets.values()):
            _untie_config(holder)  # the readout was written under its own name
        holder.config.save_pretrained(str(out))
    return index
