"""μP's coordinate check for any model and parametrization (rules §8).

``coord_check(factory, width_arg="d_model", widths=[64, 128, 256], steps=5)`` trains
``factory(d_model=w)`` a few AdamW steps per width and parametrization and records, after
every step, the RMS of each weight op's output on one fixed held-out batch. Under a
parametrization that transfers, those RMS values do not trend with width; under SP they
grow with it. ``python -m umup_fx coord-check`` is the same from the shell.

Records: ``{"parametrization", "width", "step", "layer", "rms"}`` with ``layer`` the
weight's parameter name (``step`` 0 is at init). ``slopes`` fits log RMS against log
width at the last step, per parametrization and layer kind (the name with its block
index dropped).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from umup_fx.diagnose.tracking import op_scales
from umup_fx.errors import UmupError
from umup_fx.runtime.modules import UmupModule
from umup_fx.runtime.optim import DEFAULT_LR, AdamW
from umup_fx.transfer.corpus import get_batch, load_corpus, load_file, train_val_split
from umup_fx.transfer.plots import panels, save
from umup_fx.transfer.sweep import _LossModel, _takes_targets
from umup_fx.transform import transform


def _output_rms(model: nn.Module, args: tuple) -> dict[str, float]:
    """RMS of every weight op's output: from the rewritten graphs of a transformed model,
    from forward hooks on Linear / Embedding / Conv modules of one that runs as written."""
    with torch.no_grad():
        if isinstance(model, UmupModule):
            return {r.weight: r.out_rms for r in op_scales(model, *args, backward=False)
                    if r.weight}
        out: dict[str, float] = {}
        names = {m: n for n, m in model.named_modules()}
        hooks = [m.register_forward_hook(
            lambda m, _, y: out.__setitem__(names[m] + ".weight", float(y.pow(2).mean().sqrt())))
            for m in model.modules()
            if isinstance(m, (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d))]
        try:
            model(*args)
        finally:
            for h in hooks:
                h.remove()
        return out


def _kind(layer: str) -> str:
    return ".".join("*" if part.isdigit() else part for part in layer.split("."))


def slopes(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Least-squares slope of log RMS against log width at the last step, per
    parametrization and layer kind (blocks alike averaged first)."""
    last = max(r["step"] for r in records)
    points: dict[tuple[str, str, int], list[float]] = {}
    for r in records:
        if r["step"] == last and r["rms"] > 0:
            points.setdefault((r["parametrization"], _kind(r["layer"]), r["width"]), []).append(
                math.log(r["rms"]))
    out: dict[str, dict[str, float]] = {}
    for par, kind in {(p, k) for p, k, _ in points}:
        xs = [(math.log(w), sum(v) / len(v)) for (p, k, w), v in points.items()
              if (p, k) == (par, kind)]
        if len(xs) < 2:
            continue
        mx = sum(x for x, _ in xs) / len(xs)
        my = sum(y for _, y in xs) / len(xs)
        var = sum((x - mx) ** 2 for x, _ in xs)
        out.setdefault(par, {})[kind] = sum((x - mx) * (y - my) for x, y in xs) / var
    return out


def coord_check(
    factory: Callable[..., nn.Module],
    *,
    width_arg: str,
    widths: Sequence[int],
    steps: int = 5,
    parametrizations: Sequence[str] = ("umup",),
    lr: float | None = None,
    data: str | None = None,
    json_path: str | Path | None = None,
    plot: str | Path | None = None,
    batch: int = 8,
    seq: int = 64,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the check; returns ``{"records": [...], "slopes": {...}}`` (see the module doc)."""
    if len(widths) < 2:
        raise UmupError("coord_check needs at least two widths to see a trend.")
    train_data, val_data = train_val_split(load_file(data) if data else load_corpus())
    held_out = get_batch(val_data, batch, seq, torch.Generator().manual_seed(seed + 1))
    records: list[dict[str, Any]] = []
    for par in parametrizations:
        for width in widths:
            gen = torch.Generator().manual_seed(seed)
            x, y = get_batch(train_data, batch, seq, gen)
            torch.manual_seed(seed)
            model = factory(**{width_arg: width})
            takes_targets = _takes_targets(model)
            options: dict[str, Any] = {"parametrization": par}
            if par in ("mup", "sp_emb_lr"):
                torch.manual_seed(seed)
                options["base"] = factory(**{width_arg: min(widths)})
            transform(model, (x, y) if takes_targets else (x,), **options)
            loss_model = _LossModel(model, takes_targets, par == "umup")
            optimizer = AdamW(model, lr=DEFAULT_LR[par] if lr is None else lr)
            probe = held_out if takes_targets else held_out[:1]
            for step in range(steps + 1):
                outputs = _output_rms(model, probe)
                if not outputs:  # a check that records nothing must not pass as flat
                    raise UmupError(
                        f"coord_check found no weight op to measure in {type(model).__name__} "
                        f"under parametrization={par!r} (no Linear / Embedding / Conv module "
                        "and no rewritten weight op): it cannot check this model.")
                for layer, value in outputs.items():
                    records.append({"parametrization": par, "width": width, "step": step,
                                    "layer": layer, "rms": value})
                if step == steps:
                    break
                xb, yb = get_batch(train_data, batch, seq, gen)
                optimizer.zero_grad(set_to_none=True)
                loss_model(xb, yb).backward()
                optimizer.step()
    result = {"records": records, "slopes": slopes(records)}
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=1))
    if plot:
        plot_coord_check(result, plot)
    return result


def plot_coord_check(result: dict[str, Any], path: str | Path) -> Path:
    """RMS against width at the last step, one line per layer kind, one panel per
    parametrization (the ``mup`` package's coordinate-check figure)."""
    records = result["records"]
    last = max(r["step"] for r in records)
    pars = list(dict.fromkeys(r["parametrization"] for r in records))
    fig, axes = panels(len(pars))
    for ax, par in zip(axes, pars, strict=True):
        by_kind: dict[str, dict[int, list[float]]] = {}
        for r in records:
            if r["parametrization"] == par and r["step"] == last:
                by_kind.setdefault(_kind(r["layer"]), {}).setdefault(r["width"], []).append(r["rms"])
        for kind, ws in sorted(by_kind.items()):
            widths = sorted(ws)
            ax.plot(widths, [sum(ws[w]) / len(ws[w]) for w in widths], marker="o", label=kind)
        ax.set(xscale="log", yscale="log", title=f"{par}, step {last}", xlabel="width")
    return save(fig, path, "output RMS", 6)
