"""Learning-rate sweeps across widths, for any model and parametrization (μTransfer's test).

``sweep(factory, width_arg="d_model", widths=[64, 128], lrs=[...], steps=200)`` builds
``factory(d_model=w)`` for every width, transforms it with each parametrization
(``"umup"``, ``"mup"``, ``"sp"``, ``"sp_emb_lr"``; the baselines are relative to the
smallest width), trains it on byte-level text with AdamW (linear warmup, cosine decay)
for every η and seed, and records the final train loss (mean of the last 10 steps) and a
validation loss on fixed batches. ``python -m umup_fx sweep`` is the same from the shell.

The model's forward takes ``(idx, targets)`` and returns a loss, or ``(idx)`` and returns
logits ``[B, S, V]`` (or an object with ``.logits``), to which the sweep applies the
cross-entropy (u-μP's unit-scaled one under ``"umup"``).

The JSON file holds every run and is rewritten after each, so a rerun with the same
file skips the runs already there. Each parametrization gets its own η grid, centred on
its default (``default_grid``), unless ``lrs`` gives one for all. ``summary`` gives the
best η per (parametrization, width) by validation loss averaged over seeds, how decided
it is against the seeds' spread, and the drift of log2 η* across widths, judged
against that noise too.
"""

from __future__ import annotations

import inspect
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from umup_fx.errors import UmupError
from umup_fx.runtime import ops
from umup_fx.runtime.optim import DEFAULT_LR, AdamW
from umup_fx.transfer.corpus import get_batch, load_corpus, load_file, train_val_split
from umup_fx.transfer.plots import panels, save
from umup_fx.transform import transform

_KEY = ("parametrization", "width", "lr", "seed")


def _logits(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits


class _LossModel(nn.Module):
    """Gives every model the (idx, targets) -> loss forward the sweep trains."""

    def __init__(self, model: nn.Module, takes_targets: bool, unit_loss: bool) -> None:
        super().__init__()
        self.model, self.takes_targets, self.unit_loss = model, takes_targets, unit_loss

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.takes_targets:
            return self.model(idx, targets)
        logits = _logits(self.model(idx))
        loss = ops.cross_entropy if self.unit_loss else F.cross_entropy
        return loss(logits.flatten(0, -2), targets.flatten())


def _takes_targets(model: nn.Module) -> bool:
    params = [p for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(params) >= 2 and params[1].name in ("targets", "target", "y", "labels")


def lr_schedule(steps: int, warmup: int | None = None, floor: float = 0.1):
    """Multiplier on the peak LR: linear warmup (default steps/10), then cosine decay to
    ``floor`` (the demo and the transfer tools train with it)."""
    warmup = max(1, steps // 10) if warmup is None else max(1, warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def run_one(
    factory: Callable[..., nn.Module],
    width_arg: str,
    width: int,
    base_width: int,
    lr: float,
    seed: int,
    parametrization: str,
    steps: int,
    data: tuple[torch.Tensor, torch.Tensor],
    batch: int = 8,
    seq: int = 64,
    val_batches: int = 8,
    hparams: dict[str, float] | None = None,
) -> dict[str, Any]:
    """One training run; returns its record (losses are NaN if it diverged).
    ``hparams``: u-muP multipliers (rules §6) for a ``"umup"`` run."""
    train_data, val_data = data
    gen = torch.Generator().manual_seed(seed)
    x, y = get_batch(train_data, batch, seq, gen)
    torch.manual_seed(seed)
    model = factory(**{width_arg: width})
    takes_targets = _takes_targets(model)
    base = None
    if parametrization in ("mup", "sp_emb_lr"):
        torch.manual_seed(seed)
        base = factory(**{width_arg: base_width})
    example = (x, y) if takes_targets else (x,)
    options: dict[str, Any] = {"parametrization": parametrization}
    if hparams:
        options["hparams"] = hparams
    if base is not None:
        options["base"] = base
    transform(model, example, **options)
    model = _LossModel(model, takes_targets, parametrization == "umup")
    optimizer = AdamW(model.model, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(steps))
    losses: list[float] = []
    start = time.perf_counter()
    for _ in range(steps):
        xb, yb = get_batch(train_data, batch, seq, gen)
        loss = model(xb, yb)
        if not torch.isfinite(loss):
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sched.step()
        losses.append(loss.item())
    diverged = len(losses) < steps
    record = {"parametrization": parametrization, "width": width, "lr": lr, "seed": seed,
              "train_loss": float("nan"), "val_loss": float("nan"), "diverged": diverged,
              "seconds": time.perf_counter() - start}
    if hparams:
        record["hparams"] = dict(hparams)
    if not diverged:
        record["train_loss"] = sum(losses[-10:]) / len(losses[-10:])
        vgen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            model.eval()
            vals = [float(model(*get_batch(val_data, batch, seq, vgen))) for _ in range(val_batches)]
        record["val_loss"] = sum(vals) / len(vals)
    return record


def default_grid(parametrization: str, points: int = 5) -> list[float]:
    """``points`` learning rates a factor 2 apart, centred on the parametrization's
    default η (``DEFAULT_LR``: 2^0 for u-μP, 2^-9 for the baselines): a grid per
    parametrization, since their good η differ by orders of magnitude."""
    centre = math.log2(DEFAULT_LR[parametrization])
    return [2.0 ** (centre + k - (points - 1) // 2) for k in range(points)]


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Transfer quality per parametrization, from validation losses averaged over seeds:

    - ``best``: η* per width, its loss, and the seeds' spread (max - min) there; how
      decided it is: ``margin`` (the runner-up η's loss minus η*'s), ``decided``
      (margin above the larger seed spread of the two; None with one seed) and
      ``edge`` (η* is the grid's smallest or largest η: widen the grid);
    - ``log2_lr_drift``: max - min of log2 η* across widths;
    - ``transfer_loss``: the loss lost at the widest width by training it at the
      smallest width's η* instead of its own (0 when η* transfers exactly);
    - ``drift_within_noise``: at every width, the smallest width's η* is within that
      width's seed spread of η* (so a nonzero drift is not evidence against transfer;
      None with one seed).
    """
    table: dict[tuple[str, int, float], list[float]] = {}
    for r in runs:
        table.setdefault((r["parametrization"], r["width"], r["lr"]), []).append(r["val_loss"])
    mean = {k: sum(v) / len(v) for k, v in table.items()}
    best: dict[str, dict[str, Any]] = {}
    for (par, width, lr), loss in sorted(mean.items()):
        if not math.isfinite(loss):
            continue
        entry = best.setdefault(par, {}).get(str(width))
        if entry is None or loss < entry["val_loss"]:
            vals = table[(par, width, lr)]
            best[par][str(width)] = {"lr": lr, "val_loss": loss, "seeds": len(vals),
                                     "seed_spread": max(vals) - min(vals)}
    def spread(par: str, width: int, lr: float) -> float:
        vals = table.get((par, width, lr), [])
        return max(vals) - min(vals) if len(vals) > 1 else float("nan")

    drift, lost, noise = {}, {}, {}
    for par, ws in best.items():
        for width, e in ws.items():
            grid = sorted(lr for (p, w, lr) in mean if p == par and w == int(width))
            others = [(mean[(par, int(width), lr)], lr) for lr in grid
                      if lr != e["lr"] and math.isfinite(mean[(par, int(width), lr)])]
            runner = min(others, default=(float("nan"), None))
            e["margin"] = runner[0] - e["val_loss"]
            noise_here = max(e["seed_spread"], spread(par, int(width), runner[1]))
            e["decided"] = None if e["seeds"] < 2 else bool(e["margin"] > noise_here)
            e["edge"] = len(grid) > 1 and e["lr"] in (grid[0], grid[-1])
        drift[par] = (max(math.log2(e["lr"]) for e in ws.values())
                      - min(math.log2(e["lr"]) for e in ws.values()))
        small, wide = min(ws, key=int), max(ws, key=int)
        at_proxy = mean.get((par, int(wide), ws[small]["lr"]), float("nan"))
        lost[par] = at_proxy - ws[wide]["val_loss"]
        within = [mean.get((par, int(w), ws[small]["lr"]), float("nan")) - e["val_loss"]
                  <= max(e["seed_spread"], spread(par, int(w), ws[small]["lr"]))
                  for w, e in ws.items()]
        noise[par] = None if min(e["seeds"] for e in ws.values()) < 2 else all(within)
    return {"best": best, "log2_lr_drift": drift, "transfer_loss": lost,
            "drift_within_noise": noise}


def verdict(result: dict[str, Any], par: str) -> str:
    """One line on ``par``'s η* per width, how decided each is, and the drift."""
    cells = []
    for width, e in result["best"][par].items():
        how = ("one seed: no spread to judge by" if e["decided"] is None else
               f"margin {e['margin']:.3f} {'>' if e['decided'] else '<='} seed spread")
        edge = ", at the grid's edge: widen it" if e["edge"] else ""
        cells.append(f"{width}: {e['lr']:g} ({e['val_loss']:.3f}; {how}{edge})")
    drift, noise = result["log2_lr_drift"][par], result["drift_within_noise"][par]
    if drift == 0:
        said = "log2 drift 0"
    elif noise:
        said = (f"log2 drift {drift:g}, within noise (the smallest width's η* is within the "
                "seeds' spread at every width)")
    else:
        said = f"log2 drift {drift:g}, " + ("one seed: not judged against noise"
                                            if noise is None else "beyond the seeds' spread")
    return (f"{par}: η* by width {'; '.join(cells)}; {said}; loss lost at the widest width "
            f"with the smallest's η* {result['transfer_loss'][par]:.3f}")


def sweep(
    factory: Callable[..., nn.Module],
    *,
    width_arg: str,
    widths: Sequence[int],
    lrs: Sequence[float] | None = None,
    steps: int,
    parametrizations: Sequence[str] = ("umup",),
    seeds: Sequence[int] = (0,),
    data: str | None = None,
    json_path: str | Path | None = None,
    plot: str | Path | None = None,
    batch: int = 8,
    seq: int = 64,
    progress: bool = True,
) -> dict[str, Any]:
    """Run (or resume) the sweep; returns ``{"runs": [...], **summary(runs)}``.
    ``lrs``: one grid for every parametrization; by default ``default_grid`` of each."""
    if not widths or (lrs is not None and not lrs) or steps < 1:
        raise UmupError("sweep needs at least one width, one lr and steps >= 1.")
    grids = {p: list(lrs) if lrs is not None else default_grid(p) for p in parametrizations}
    corpus = load_file(data) if data else load_corpus()
    split = train_val_split(corpus)
    path = Path(json_path) if json_path else None
    runs: list[dict[str, Any]] = []
    if path is not None and path.exists():
        runs = json.loads(path.read_text())["runs"]
    done = {tuple(r[k] for k in _KEY) for r in runs}
    todo = [(p, w, lr, s) for p in parametrizations for w in widths for lr in grids[p]
            for s in seeds if (p, w, lr, s) not in done]
    bar = _progress(len(todo)) if progress else None
    for par, width, lr, seed in todo:
        runs.append(run_one(factory, width_arg, width, min(widths), lr, seed, par, steps, split,
                            batch, seq))
        if path is not None:
            path.write_text(json.dumps({"runs": runs, **summary(runs)}, indent=1))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(par=par, width=width, lr=lr, val=f"{runs[-1]['val_loss']:.3f}")
    if bar is not None:
        bar.close()
    result = {"runs": runs, **summary(runs)}
    if plot:
        plot_sweep(result, plot)
    return result


def _progress(total: int) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional (the demo extra)
        return None
    return tqdm(total=total, desc="sweep", unit="run", disable=None)  # off when not a tty


def plot_sweep(result: dict[str, Any], path: str | Path) -> Path:
    """Validation loss against η, one line per width, one panel per parametrization."""
    pars = list(dict.fromkeys(r["parametrization"] for r in result["runs"]))
    fig, axes = panels(len(pars))
    for ax, par in zip(axes, pars, strict=True):
        rows = [r for r in result["runs"] if r["parametrization"] == par]
        for width in sorted({r["width"] for r in rows}):
            by_lr: dict[float, list[float]] = {}
            for r in rows:
                if r["width"] == width:
                    by_lr.setdefault(r["lr"], []).append(r["val_loss"])
            lrs = sorted(by_lr)
            ax.plot(lrs, [sum(by_lr[lr]) / len(by_lr[lr]) for lr in lrs], marker="o",
                    label=f"width {width}")
        ax.set_xscale("log", base=2)
        ax.set_title(par)
        ax.set_xlabel("learning rate η")
    return save(fig, path, "validation loss", 8)
