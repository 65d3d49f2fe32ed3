"""``umup_fx.check``: the safety net for what no rule knows (rules §8).

One forward and backward of a transformed model at init, at the example inputs' size;
per weight op the RMS of its output, of the gradient at its output and of its weight's
gradient, and the RMS of the model's output against its target. Every value outside
the band (``BAND``, with the two expected exceptions of §8) is flagged with the op, the
weight and the user's source line. ``transform`` runs it where it is cheap and warns
(``ScaleWarning``) with the same lines.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from umup_fx.diagnose.tracking import OpScale, measure
from umup_fx.errors import UmupError
from umup_fx.runtime.modules import UmupModule

# A u-μP value at init is unit up to a small factor; 5 either way is wrong (rules §8).
BAND = (0.2, 5.0)
# transform's own check runs on models up to this many parameter elements (one forward
# and backward through an fx.Interpreter, and one gradient per parameter held at once).
CHEAP_PARAMS = 50_000_000


class ScaleWarning(UserWarning):
    """At init, some weight op of the transformed model is far from unit scale."""


@dataclass
class Flag:
    """One value outside its band."""

    op: OpScale
    what: str  # "output" | "output grad" | "weight grad"
    value: float
    low: float
    high: float

    def __str__(self) -> str:
        who = self.op.weight or self.op.node
        return (f"{who} ({self.op.op}, node {self.op.node}): {self.what} RMS {self.value:.3g} "
                f"outside [{self.low:.3g}, {self.high:.3g}] at {self.op.source}")


@dataclass
class CheckReport:
    """What ``check`` measured: weight ops in forward order, the output, the flags."""

    model_name: str
    ops: list[OpScale]
    output_rms: float | None  # None when the model returns a scalar (its loss)
    output_target: float | None
    flags: list[Flag] = field(default_factory=list)
    output_flag: str | None = None
    band: tuple[float, float] = BAND

    @property
    def ok(self) -> bool:
        return not self.flags and self.output_flag is None

    def lines(self) -> list[str]:
        """One line per flagged value (empty when everything is inside its band)."""
        return [str(f) for f in self.flags] + ([self.output_flag] if self.output_flag else [])

    def __str__(self) -> str:
        head = f"umup_fx.check of {self.model_name}: {len(self.ops)} weight ops, " + (
            "all inside their bands" if self.ok else f"{len(self.lines())} value(s) outside")
        rows = [head, f"{'weight / op':48} {'role':8} {'out':>8} {'out grad':>9} {'W grad':>8}"]
        flagged = {(id(f.op), f.what) for f in self.flags}

        def cell(r: OpScale, what: str, v: float | None, width: int) -> str:
            text = "-" if v is None else f"{v:.3g}" + ("!" if (id(r), what) in flagged else "")
            return f"{text:>{width}}"

        for r in self.ops:
            rows.append(f"{(r.weight or r.node)[:48]:48} {(r.role or '-'):8} "
                        f"{cell(r, 'output', r.out_rms, 8)} {cell(r, 'output grad', r.grad_rms, 9)} "
                        f"{cell(r, 'weight grad', r.weight_grad_rms, 8)}")
        if self.output_rms is not None:
            rows.append(f"model output RMS {self.output_rms:.3g} (target {self.output_target:.3g})")
        rows += self.lines()
        return "\n".join(rows)


def bands(op: OpScale, band: tuple[float, float] = BAND) -> dict[str, tuple[float, float]]:
    """The band of each measured value of one weight op (rules §8).

    A readout's output is ``fan_in^-1/2`` (§3), so its band is the unit band times that;
    q / k projections get gradients near ``S^-1/2`` (S the key length), as in the
    reference library's decoder, times the spread of their attention's keys and values
    across positions (only their differences enter), so their gradients' lower end is
    multiplied by both. A weight gradient's upper end is multiplied by its rows'
    measured coherence (its ``rows^-1/2`` assumes independent rows); a v projection's
    output gradient's upper end by how alike its attention's output gradients are across
    queries (near-uniform attention hands every value their sum); an embedding's by
    the factor u-muP predicts for its table (``tracking.lookup_factor``: rows hit by
    many tokens sum a gradient part that every position shares). A
    router's gradients are its gates' (rules §10): the band around the value its top-k
    gating gives at init (``OpScale.router_grad``; down to 0 when that is 0).
    """
    lo, hi = band
    out = {"output": (lo, hi), "output grad": (lo, hi), "weight grad": (lo, hi)}
    if op.role == "output" and op.fan_in:
        t = op.fan_in ** -0.5
        out["output"] = (lo * t, hi * t)
    if op.key_len:
        q = op.key_len ** -0.5 * op.key_spread
        out["output grad"] = out["weight grad"] = (lo * q, hi)
    if op.router_grad is not None:
        g = op.router_grad
        out["output grad"] = out["weight grad"] = (lo * g, hi * g) if g > 0 else (0.0, hi)
    low, high = out["output grad"]
    copies = op.lookup_factor if op.summed_copies > 1 else 1.0
    out["output grad"] = (low, high * max(1.0, op.query_coherence, copies))
    low, high = out["weight grad"]
    out["weight grad"] = (low, high * max(1.0, op.row_coherence, op.lookup_factor))
    return out


def _outside(v: float, low: float, high: float) -> bool:
    return not math.isfinite(v) or not low <= v <= high


@contextmanager
def _state_kept(model: nn.Module) -> Iterator[None]:
    """Buffers (batch-norm statistics) and the RNG streams are as before afterwards."""
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            with torch.no_grad():
                for n, b in model.named_buffers():
                    if n in buffers:
                        b.copy_(buffers[n])


def check(
    model: nn.Module,
    example_inputs: Any = (),
    example_kwargs: dict[str, Any] | None = None,
    *,
    band: tuple[float, float] = BAND,
) -> CheckReport:
    """Measure one forward and backward of a transformed ``model`` and flag what is off.

    Args:
        model: the module ``umup_fx.transform`` returned (at init: before training).
        example_inputs / example_kwargs: one call, as given to ``transform``. The
            backward starts from the model's first output with what a loss sends it:
            a scalar loss as is, returned logits a mean cross-entropy's gradient
            (against random targets), any other tensor a unit-Gaussian gradient.
        band: the unit band (default ``BAND`` = [1/5, 5]).

    Returns:
        A ``CheckReport``; ``report.lines()`` names each flagged value, its weight, op
        and source line; ``print(report)`` shows every weight op. The model's
        parameters, ``.grad``, buffers and the RNG streams are left as they were.

    Raises:
        UmupError: ``model`` was not transformed.
    """
    if not isinstance(model, UmupModule):
        raise UmupError(
            f"umup_fx.check measures a transformed model; {type(model).__name__} is not one. "
            "Call umup_fx.check(umup_fx.transform(model, inputs), inputs)."
        )
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    with _state_kept(model):
        measured = measure(model, *args, **dict(example_kwargs or {}))
    ops = [r for r in measured.records if r.weight is not None]
    flags = []
    for r in ops:
        limits = bands(r, band)
        for what, v in (("output", r.out_rms), ("output grad", r.grad_rms),
                        ("weight grad", r.weight_grad_rms)):
            if v is not None and _outside(v, *limits[what]):
                flags.append(Flag(r, what, v, *limits[what]))
    report = CheckReport(model.umup_plan.model_name, ops, None, None, flags, band=band)
    y = measured.backward_from
    if y is not None and y.numel() > 1 and y.is_floating_point():
        readouts = [r for r in ops if r.role == "output" and r.fan_in]
        report.output_target = readouts[-1].fan_in ** -0.5 if readouts else 1.0
        report.output_rms = float(y.detach().float().pow(2).mean().sqrt())
        lo, hi = band[0] * report.output_target, band[1] * report.output_target
        if _outside(report.output_rms, lo, hi):
            what = "logits (a readout's fan_in^-1/2)" if readouts else "unit"
            report.output_flag = (f"model output RMS {report.output_rms:.3g} outside "
                                  f"[{lo:.3g}, {hi:.3g}], the band around its target ({what})")
    return report


def cheap(model: nn.Module) -> bool:
    """Whether ``transform`` runs the check by default: weights materialised on one
    device (not meta, not sharded) and at most ``CHEAP_PARAMS`` elements."""
    params = list(model.parameters())
    if not params or any(p.is_meta or type(p.data).__name__ == "DTensor" for p in params):
        return False
    return len({p.device for p in params}) == 1 and sum(p.numel() for p in params) <= CHEAP_PARAMS


def warn_if_off(model: UmupModule, example_inputs: Any, example_kwargs: dict | None,
                stacklevel: int = 3) -> CheckReport | None:
    """``transform``'s default check: one ``ScaleWarning`` listing every flagged value.

    A check that cannot run (the forward fails on the example inputs outside capture)
    is one warning saying so, never an error: the model itself is transformed.
    """
    try:
        report = check(model, example_inputs, example_kwargs)
    except Exception as exc:  # noqa: BLE001 - the check is advice; transform succeeded
        warnings.warn(f"umup_fx: the unit-scale check of the transformed model could not run "
                      f"({type(exc).__name__}: {exc}); run umup_fx.check(model, inputs) to "
                      "see the scales.", ScaleWarning, stacklevel=stacklevel)
        return None
    lines = report.lines()
    if lines:
        shown = "\n  ".join(lines[:12]) + (f"\n  ... and {len(lines) - 12} more" if len(lines) > 12 else "")
        warnings.warn(
            f"umup_fx: {report.model_name} is not at unit scale at init: {len(lines)} value(s) "
            f"outside the band [{report.band[0]:g}, {report.band[1]:g}] (docs/rules.md §8):\n  "
            f"{shown}\nSome op or constant of the model has no u-muP rule; set its role with "
            "roles={...}, rewrite it in a form listed in docs/rules.md §3, or report it. "
            "umup_fx.check(model, inputs) prints every op; transform(..., check=False) skips this.",
            ScaleWarning, stacklevel=stacklevel)
    return report
