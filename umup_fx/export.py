"""``umup_fx.export``: a transformed model back to its own class, u-muP's scales folded
into its weights.

The result is a module of the model's original class (``type(...)`` is that class, its
``forward`` the original code, no umup_fx needed to run or load it) whose outputs equal
the transformed model's. ``export_scales.solve_folding`` finds what each weight is
multiplied by; this module copies the model, restores its classes, applies the factors
(untying a tied weight whose uses need different factors, and saying so in a Hugging
Face config), sets the norm parameters u-muP froze to their neutral values, and
restores ``requires_grad``.

Loading a u-muP ``state_dict`` straight into the original class would give a model that
runs and computes something else: the weights are at unit scale and the scales live in
the transformed graphs (a strict load refuses it on the root's ``_extra_state``).
``export`` is the way out; ``save_pretrained`` of a transformed Hugging Face model takes
it (``umup_fx.hf_save``, docs/deploy.md).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from umup_fx.export_scales import ExportError, Folding, solve_folding
from umup_fx.passes.scale_norms import NORM_SCALE_PREFIX
from umup_fx.runtime.adapters import peft_inner, unguard
from umup_fx.runtime.modules import UmupModule, UmupRegion
from umup_fx.runtime.names import canonical_name, unwrap

__all__ = ["ExportError", "check_importable", "export", "import_pretrained"]

_TRANSFORMED_ATTR = "_umup_transformed"  # umup_fx.transform marks every parameter


def _plain_copy(model: UmupModule) -> nn.Module:
    """A deep copy of ``model`` with every installed region back to its own class."""
    skip: dict[int, Any] = {}
    for m in model.modules():
        for key, value in m.__dict__.items():
            if key.startswith("_umup_"):
                skip[id(value)] = None  # graphs, plan: not copied
    plain = copy.deepcopy(model, skip)
    for m in plain.modules():
        unguard(m)  # a LoRA layer's class that refuses merges
        if isinstance(m, UmupRegion):
            m.__class__ = next(c for c in type(m).__mro__
                               if not issubclass(c, UmupRegion) and issubclass(c, nn.Module))
        for key in [k for k in m.__dict__ if k.startswith("_umup_")]:
            del m.__dict__[key]
        for name in [b for b in m._buffers if b.startswith("_umup_")]:  # graph constants,
            # an import's norm factors: the plain class reads neither
            del m._buffers[name]
            m._non_persistent_buffers_set.discard(name)
    for p in plain.parameters():
        if hasattr(p, _TRANSFORMED_ATTR):
            delattr(p, _TRANSFORMED_ATTR)
    return plain


def _aliases(model: nn.Module) -> dict[str, list[str]]:
    """Canonical parameter name -> every name it has (tied parameters have several)."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(canonical_name(name))
    return {names[0]: names for names in by_id.values()}


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9)


def _set_param(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    setattr(module, attr, nn.Parameter(value, requires_grad=True))


@torch.no_grad()
def _apply(plain: nn.Module, folding: Folding) -> list[str]:
    """Scale every parameter use; returns the names of the parameters it untied."""
    params = dict(plain.named_parameters())
    aliases = _aliases(plain)
    untied: list[str] = []
    for name, value in folding.frozen.items():
        if name in params:
            params[name].fill_(value)
    for name, uses in folding.factors.items():
        p = params[name]
        distinct = []
        for f, op, owner in uses:
            if not any(_close(f, g) for g, _, _ in distinct):
                distinct.append((f, op, owner))
        if len(distinct) == 1:
            p.mul_(distinct[0][0])
            continue
        names = aliases.get(name, [name])
        if len(distinct) > len(names):
            raise ExportError(
                f"parameter {name!r} is used by {len(distinct)} ops that need different "
                f"scales ({', '.join(op for _, op, _ in distinct)}) and the plain model "
                "reads it through one attribute: the export cannot give each use its own.")
        base = p.detach().clone()
        placed: set[str] = set()
        for f, _op, owner in distinct:
            # The alias owned by the op's module (lm_head.weight for the readout).
            match = [n for n in names if n not in placed
                     and (n.rpartition(".")[0] == owner or n.startswith(owner + "."))]
            target = (match or [n for n in names if n not in placed])[0]
            placed.add(target)
            _set_param(plain, target, base * f)
            if target != name:
                untied.append(target)
    return untied


def _untie_config(plain: nn.Module) -> None:
    """Tell a Hugging Face config (and its text sub-config) the embeddings are untied."""
    config = getattr(plain, "config", None)
    for cfg in (config, getattr(config, "text_config", None)):
        if cfg is not None and hasattr(cfg, "tie_word_embeddings"):
            cfg.tie_word_embeddings = False


def _is_sharded(model: nn.Module) -> bool:
    """Whether any parameter is a DTensor (FSDP2's fully_shard, tensor parallel)."""
    return any(type(p).__name__ == "DTensor" or type(p.data).__name__ == "DTensor"
               for p in model.parameters())


def check_importable(model: nn.Module) -> None:
    """``transform(..., pretrained=True)`` converts the weights the model holds: they must
    be there, whole, before anything is captured or installed (else ``ExportError``)."""
    if any(p.is_meta for p in model.parameters()):
        raise ExportError(
            "transform(..., pretrained=True) converts the weights the model holds, and "
            "they are on meta: load the checkpoint first (or transform without "
            "pretrained and load a u-muP checkpoint).")
    if _is_sharded(model):
        raise ExportError(
            "transform(..., pretrained=True) converts the weights the model holds, and "
            "they are sharded (DTensor: fully_shard / tensor parallel was applied first). "
            "Load the checkpoint into the unsharded model, transform it with "
            "pretrained=True, then fully_shard it.")


def _export_peft(wrapper: nn.Module, inner: nn.Module) -> nn.Module:
    """A copy of a ``PeftModel`` around ``export(inner)``: PEFT's own merge, unload and
    adapter ``save_pretrained`` then act on plain weights (docs/training.md, "LoRA / PEFT")."""
    plain = export(inner)
    plain_modules = dict(plain.named_modules(remove_duplicate=False))
    memo: dict[int, Any] = {id(m): plain_modules[name]
                            for name, m in inner.named_modules(remove_duplicate=False)}
    return copy.deepcopy(wrapper, memo)  # the wrapper copied, the transformed model never


def export(model: nn.Module) -> nn.Module:
    """A new module of ``model``'s original class with u-muP's scales folded into its weights.

    Its outputs equal the transformed model's (fp32: relative 1e-4) at any batch size and
    sequence length; it runs without umup_fx, and a Hugging Face model's
    ``save_pretrained`` output loads with plain ``from_pretrained``. Weights stay in the
    model's dtype. A tied weight whose uses need different factors is untied (and a
    Hugging Face config says ``tie_word_embeddings=False``); a model transformed with
    ``pretrained=True`` keeps its ties (the import's factors, so its norms' eps is the
    checkpoint's). ``model`` is not changed. A PEFT ``PeftModel`` whose model was
    transformed gives a new ``PeftModel`` over the exported model (its LoRA weights in
    plain units too): ``umup_fx.export(peft_model).merge_and_unload()`` is the merged
    plain model.

    Raises:
        ExportError: ``model`` is not transformed, its parameters are sharded (DTensor:
            save a DCP checkpoint and export that, docs/deploy.md), the original code
            cannot express one of its scales (the error names the op and its source
            line), or an imported model's norm factor buffers were overwritten.
    """
    inner = peft_inner(model)
    if inner is not None:
        return _export_peft(model, inner)
    if _is_sharded(model):
        # Gathering here would be a collective every rank must join, and the usual
        # ``if rank == 0: export(model)`` would hang instead of failing.
        raise ExportError(
            f"umup_fx.export copies the whole model into this process, and "
            f"{type(model).__name__}'s parameters are sharded (DTensor: fully_shard / tensor "
            "parallel). On every rank, save its state with torch.distributed.checkpoint "
            "(dcp.save(get_model_state_dict(model), checkpoint_id=DIR), or your training "
            "checkpoint), then in one plain process run: python -m umup_fx export "
            "MODULE:FACTORY --input ... --checkpoint DIR --out PLAIN_DIR. Or, where the "
            "whole model fits in one process: on every rank get_model_state_dict(model, "
            "options=StateDictOptions(full_state_dict=True, cpu_offload=True)), and on rank "
            "0 load it into an unsharded transformed twin and export that (docs/deploy.md, "
            "'At scale').")
    imported = {canonical_name(name): b for name, b in model.named_buffers()
                if name.rpartition(".")[2].startswith(NORM_SCALE_PREFIX)}
    # An imported model's norms multiply their inputs by the import's factors: its tied
    # weights stay tied, so the solve is the import's own and the plain model's norms
    # see those factors with the checkpoint's eps (the original model, round trip).
    folding = solve_folding(model, tied=bool(imported))
    for path, buffer in imported.items():  # (rounded to the buffer's dtype: model.half())
        factor, tol = float(buffer), max(1e-5, torch.finfo(buffer.dtype).eps)
        if not math.isclose(folding.norm_scales.get(path, math.nan), factor, rel_tol=tol):
            raise ExportError(
                f"the imported norm factor {path} is {factor:.6g} where the graphs give "
                f"{folding.norm_scales.get(path, math.nan):.6g}: it was overwritten (to_empty "
                "voids it; it is not in the state_dict), so the transformed model's norm is "
                "off there too. Transform the checkpoint again with pretrained=True (that "
                "sets the factors) and load the trained u-muP state_dict into it.")
    plain = _plain_copy(model)  # type: ignore[arg-type]
    if _apply(plain, folding):
        _untie_config(plain)
    for p in plain.parameters():
        p.requires_grad_(True)
    return plain


@torch.no_grad()
def import_pretrained(model: nn.Module) -> None:
    """The inverse of ``export``, in place: divide each weight of a just-transformed
    ``model`` (still holding the original model's weights) by its export factor, so the
    transformed model computes the function the original computed (``transform(...,
    pretrained=True)``). Its norm gains stay trainable and in use (they are part of the
    function); a tied weight keeps one tensor, so its uses share one factor. Each norm
    gets its input's factor as a non-persistent buffer, which its graph multiplies its
    input by (or divides its eps by, squared), so it computes the checkpoint's norm with
    the checkpoint's eps.

    Raises:
        ExportError: the weights are on ``meta`` or sharded, or a scale cannot be carried
            over.
    """
    check_importable(model)
    folding = solve_folding(model, tied=True)
    params = {canonical_name(n): p for n, p in model.named_parameters()}
    for name, uses in folding.factors.items():
        params[name].div_(uses[0][0])
    for path, factor in folding.norm_scales.items():
        # Each norm's input is its checkpoint value / factor: the norm multiplies it back
        # (passes/scale_norms.py), so its eps acts as the checkpoint's. Not in the
        # state_dict (the keys stay the class's): the factor is the graph's, not trained.
        owner, _, name = path.rpartition(".")
        module = unwrap(model)
        for part in owner.split(".") if owner else ():
            module = unwrap(getattr(module, part))
        device = next(module.parameters(), next(iter(params.values()))).device  # its own
        module.register_buffer(name, torch.tensor(factor, dtype=torch.float32, device=device),
                               persistent=False)
