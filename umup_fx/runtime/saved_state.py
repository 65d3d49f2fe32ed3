"""What a transformed model's checkpoint carries about how it was transformed.

The scales of a transformed model live in its graphs, and they depend on how it was
transformed: the example call's sizes (rules §3, "Reference sizes"), the hparams, the
parametrization and the options that change a graph. The root's ``_extra_state``
(``get_extra_state``) holds them as JSON bytes in a uint8 tensor, so ``state_dict``,
``torch.save``, safetensors and DCP all carry them; a load into a transformed model
compares them with its own (``before_load``) and refuses a checkpoint of another
transform before any tensor is copied.

A folder written by ``save_pretrained`` of a transformed Hugging Face model holds the
*plain* model (u-muP's scales folded in, ``umup_fx.export``), so that the plain class
loads the same function. For the transformed model to come back bit for bit (an HF
Trainer resume loads that folder into it), the folder also holds, per folded tensor,
its factor and the few last-bit corrections that dividing by it needs: ``fold_extras``
writes them, ``before_load`` undoes the folding with them. Nothing here imports the
compiler.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch

from umup_fx.errors import CheckpointError

EXTRA_STATE = "_extra_state"  # nn.Module's key for get_extra_state
PREFIX = "_umup_fx."  # the folded folder's correction tensors
VERSION = 1
_PAD = 4096  # DCP loads into a tensor of the saved size: keep it one size
_CHECKED = ("reference", "hparams", "parametrization", "trainable_norms", "pretrained", "roles",
            "sigma_init")
_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
             torch.float64: torch.int64}


def encode(state: dict[str, Any]) -> torch.Tensor:
    """``state`` as a uint8 tensor of JSON bytes, padded with spaces to a multiple of 4 KiB."""
    raw = json.dumps(state, sort_keys=True).encode()
    raw += b" " * (-len(raw) % _PAD)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone()


def decode(tensor: Any) -> dict[str, Any]:
    if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.uint8:
        raise CheckpointError(
            f"the checkpoint's {EXTRA_STATE} is a {type(tensor).__name__}, not umup_fx's "
            "settings (a uint8 tensor): it was not saved from a transformed model.")
    try:
        state = json.loads(bytes(tensor.cpu().tolist()).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"the checkpoint's {EXTRA_STATE} is not umup_fx's settings "
                              f"({exc}): it was not saved from a transformed model.") from None
    if not isinstance(state, dict) or state.get("umup_fx") != VERSION:
        raise CheckpointError(f"the checkpoint's {EXTRA_STATE} is not umup_fx's settings "
                              f"(version {VERSION}): it was not saved from a transformed model.")
    return state


def settings(module: torch.nn.Module) -> dict[str, Any]:
    """The transform's settings the root keeps (``transform`` sets them)."""
    return module.__dict__["_umup_settings"]


def mismatch(saved: dict[str, Any], own: dict[str, Any]) -> list[str]:
    """What differs between a checkpoint's settings and a model's, one line each. Shapes
    are compared for the arguments both example calls had (a model transformed without
    labels takes the weights of one transformed with them)."""
    out = []
    for key in _CHECKED:
        a, b = saved.get(key), own.get(key)
        if key == "reference":
            a, b = ({k: v for k, v in d.items() if k in saved[key] and k in own[key]}
                    for d in (saved[key], own[key]))
        if a != b:
            out.append(f"{key}: checkpoint {a}, this model {b}")
    return out


def reference_inputs_note(reference: dict[str, list[int]]) -> str:
    return ", ".join(f"{name} {list(shape)}" for name, shape in sorted(reference.items()))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_INT_VIEW[t.dtype]).long()


def _unfold(plain: torch.Tensor, factor: float) -> torch.Tensor:
    """``plain / factor`` rounded to ``plain``'s dtype, the same on every machine."""
    return (plain.double() / factor).to(plain.dtype)


def fold_extras(unit: dict[str, torch.Tensor], plain: dict[str, torch.Tensor],
                state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors that bring each key of the plain state dict ``plain`` back to the
    unit-scale ``unit`` exactly: per folded key its factor (in the settings) and the
    differences in the last bits of ``plain / factor``, packed for all keys into
    ``_umup_fx.delta`` (int8) and, where few are not 0, ``_umup_fx.index`` (their flat
    positions); a tensor no factor brings back is stored as it is
    (``_umup_fx.value.<key>``). Returned with the settings (form "folded") under
    ``_extra_state``."""
    factors: dict[str, float] = {}
    fixes: dict[str, list] = {}  # key -> ["sparse" | "dense", start, count] or ["value"]
    indices: list[torch.Tensor] = []
    deltas: list[torch.Tensor] = []
    values: dict[str, torch.Tensor] = {}
    n_index = n_delta = 0
    for key, x in unit.items():
        if key == EXTRA_STATE or key not in plain:
            continue
        x, v = x.detach().cpu(), plain[key].detach().cpu()
        if v.dtype == x.dtype and v.shape == x.shape and torch.equal(_raw(v), _raw(x)):
            continue  # written as it is (buffers, factor-1 weights)
        delta = _delta(x, v)
        if delta is None:
            values[f"{PREFIX}value.{key}"] = x.clone()  # frozen, or no factor fits
            fixes[key] = ["value"]
            continue
        factors[key], delta = delta
        nonzero = delta.nonzero().flatten()
        if len(nonzero) * 5 < delta.numel():  # mostly exact: positions + deltas
            fixes[key] = ["sparse", n_index, len(nonzero)]
            indices.append(nonzero)
            deltas.append(delta[nonzero])
            n_index += len(nonzero)
        else:
            fixes[key] = ["dense", n_index, delta.numel()]
            deltas.append(delta)
        fixes[key].append(n_delta)
        n_delta += len(deltas[-1])
    extras = dict(values)
    index = torch.cat([torch.zeros(0, dtype=torch.long), *indices])
    if not len(index) or index.max() < 2**31:  # positions within one tensor: int32 holds them
        index = index.to(torch.int32)
    extras[f"{PREFIX}index"] = index
    extras[f"{PREFIX}delta"] = torch.cat([torch.zeros(0, dtype=torch.int8), *deltas])
    extras[EXTRA_STATE] = encode({**state, "form": "folded", "factors": factors, "fixes": fixes})
    return extras


def _delta(x: torch.Tensor, v: torch.Tensor) -> tuple[float, torch.Tensor] | None:
    """The factor ``v`` is ``x`` times (least squares) and the int8 bit differences of
    ``x`` from ``v / factor``, flat; None when they do not fit."""
    if x.dtype not in _INT_VIEW or v.dtype != x.dtype or v.shape != x.shape:
        return None
    xd = x.double()
    factor = float((v.double() * xd).sum() / (xd * xd).sum())
    if factor == 0.0 or not math.isfinite(factor):
        return None
    delta = (_bits(x) - _bits(_unfold(v, factor))).flatten()
    if delta.numel() and delta.abs().max() > 127:
        return None
    return factor, delta.to(torch.int8)


def _raw(t: torch.Tensor) -> torch.Tensor:
    return _bits(t) if t.dtype in _INT_VIEW else t


def _restore(state_dict: dict[str, Any], prefix: str, saved: dict[str, Any]) -> None:
    """Turn a folded state dict back into the unit-scale one, in place."""
    index = state_dict.get(f"{prefix}{PREFIX}index")
    delta = state_dict.get(f"{prefix}{PREFIX}delta")
    for key, (how, *at) in saved.get("fixes", {}).items():
        name = prefix + key
        if name not in state_dict:
            continue  # a tied alias the writer left out
        if how == "value":
            state_dict[name] = state_dict[f"{prefix}{PREFIX}value.{key}"]
            continue
        plain = state_dict[name]
        bits = _bits(_unfold(plain.detach().cpu(), saved["factors"][key])).flatten()
        start, count, first = at
        fix = delta[first:first + count].long().cpu()
        if how == "sparse":
            bits[index[start:start + count].long().cpu()] += fix
        else:
            bits += fix
        unit = bits.to(_INT_VIEW[plain.dtype]).view(plain.dtype).view(plain.shape)
        state_dict[name] = unit.to(plain.device)
    for key in [k for k in state_dict if k.startswith(prefix + PREFIX)]:
        del state_dict[key]


def before_load(module: torch.nn.Module, state_dict: dict[str, Any], prefix: str) -> None:
    """Run first when a state dict loads into the transformed ``module``: refuse one saved
    from another transform (``CheckpointError``, nothing loaded yet), undo a
    ``save_pretrained`` folder's folding exactly. A state dict without settings (saved
    before umup_fx kept them, or filtered) loads unchecked, as it always did."""
    own = settings(module)
    key = prefix + EXTRA_STATE
    if key not in state_dict:
        state_dict[key] = encode({**own, "form": "unit"})
        return
    saved = decode(state_dict[key])
    differ = mismatch(saved, own)
    if differ:
        raise CheckpointError(
            f"this checkpoint was saved from a {type(module).__name__} transformed with "
            f"other settings than this one ({'; '.join(differ)}): its weights would run "
            "under other scales. Transform the model as the checkpoint's was (example "
            f"inputs of these sizes: {reference_inputs_note(saved['reference'])}; the "
            "same hparams and options), then load it.")
    if saved.get("form") == "folded":
        _restore(state_dict, prefix, saved)
        state_dict[key] = encode({**saved, "form": "unit", "factors": {}, "fixes": {}})
