"""Independent hyperparameter search (the u-μP paper's §4.5) on a small proxy.

u-μP's multipliers (rules §6) are designed to be tuned one at a time: ``search`` sweeps η
at the proxy width with every multiplier at 1, then each multiplier alone around that
η* (the others at 1), keeps each one's best value, trains the proxy with all the
winners together, and finally trains the target width with the defaults and with the
combined set, both at the proxy's η*, to measure what the search gained where it
matters. ``python -m umup_fx search`` is the same from the shell.

The JSON holds every run (the sweep's record plus ``stage`` and ``hparams``) and is
rewritten after each; a rerun with the same file reuses the runs already there.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from umup_fx.errors import UmupError
from umup_fx.hparams import HParams
from umup_fx.transfer.corpus import load_corpus, load_file, train_val_split
from umup_fx.transfer.sweep import run_one

FIELDS = tuple(f.name for f in dataclasses.fields(HParams))


def search(
    factory: Callable[..., nn.Module],
    *,
    width_arg: str,
    proxy_width: int,
    target_width: int,
    lrs: Sequence[float],
    steps: int,
    multipliers: Sequence[float] = (0.25, 0.5, 2.0, 4.0),
    fields: Sequence[str] = FIELDS,
    seeds: Sequence[int] = (0,),
    data: str | None = None,
    json_path: str | Path | None = None,
    batch: int = 8,
    seq: int = 64,
) -> dict[str, Any]:
    """Run the search; returns ``{"runs", "lr", "best", "proxy", "target"}``: the proxy's
    η*, the winning value of each multiplier, the proxy's loss with the defaults and with
    the combined set, and the same at the target width (with the gain)."""
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise UmupError(f"unknown u-muP multipliers {unknown}; known: {', '.join(FIELDS)}.")
    split = train_val_split(load_file(data) if data else load_corpus())
    path = Path(json_path) if json_path else None
    runs: list[dict[str, Any]] = json.loads(path.read_text())["runs"] if path and path.exists() else []

    def loss(stage: str, width: int, lr: float, hp: dict[str, float]) -> float:
        vals = []
        for seed in seeds:
            key = (stage, width, lr, seed, json.dumps(hp, sort_keys=True))
            found = next((r for r in runs if (r["stage"], r["width"], r["lr"], r["seed"],
                                              json.dumps(r.get("hparams", {}), sort_keys=True))
                          == key), None)
            if found is None:
                found = run_one(factory, width_arg, width, width, lr, seed, "umup", steps, split,
                                batch, seq, hparams=hp or None)
                found["stage"] = stage
                found.setdefault("hparams", {})
                runs.append(found)
                if path is not None:
                    path.write_text(json.dumps({"runs": runs}, indent=1))
            vals.append(found["val_loss"])
        return sum(vals) / len(vals)

    def argmin(pairs: list[tuple[Any, float]]) -> tuple[Any, float]:
        finite = [p for p in pairs if p[1] == p[1]]  # NaN: diverged
        if not finite:
            raise UmupError("every run diverged: lower the learning rates.")
        return min(finite, key=lambda p: p[1])

    lr, default_loss = argmin([(lr, loss("lr", proxy_width, lr, {})) for lr in lrs])
    best: dict[str, float] = {}
    for name in fields:
        value, value_loss = argmin([(1.0, default_loss)] + [
            (m, loss(name, proxy_width, lr, {name: m})) for m in multipliers])
        if value != 1.0:
            best[name] = value
    combined = loss("combined", proxy_width, lr, best) if best else default_loss
    target_default = loss("target", target_width, lr, {})
    target_combined = loss("target", target_width, lr, best) if best else target_default
    result = {
        "runs": runs,
        "lr": lr,
        "best": best,
        "proxy": {"width": proxy_width, "default": default_loss, "combined": combined},
        "target": {"width": target_width, "default": target_default,
                   "combined": target_combined, "gain": target_default - target_combined},
    }
    if path is not None:
        path.write_text(json.dumps(result, indent=1))
    return result
