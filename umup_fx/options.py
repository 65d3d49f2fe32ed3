"""What a user can ask of the pipeline, in one frozen object that every pass reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import UmupError
from .hparams import HParams

FP8_MODES = ("off", "auto", "simulate", "scaled_mm")


@dataclass(frozen=True)
class Options:
    """Options of ``transform`` and of the ``"umup"`` compile backend.

    Attributes:
        hparams: the u-muP multipliers (rules section 6).
        roles: {parameter name: role} overriding the analysis (rules section 1).
        trainable_norms: keep norm gains / biases trainable (rules section 2 makes
            norms non-parametric by default: gains frozen at 1, biases at 0).
        reinit: re-initialise weights to unit scale (rules section 2). Turn off only
            when you load u-muP weights right after.
        fp8: "off"; "auto" (real FP8 where the GPU has it, simulated elsewhere);
            "simulate" (cast round-trip, any device); "scaled_mm" (real FP8, error
            where the hardware cannot). ``True`` means "auto", ``False`` "off".
    """

    hparams: HParams = field(default_factory=HParams)
    roles: dict[str, str] | None = None
    trainable_norms: bool = False
    reinit: bool = True
    fp8: str = "off"

    @classmethod
    def build(cls, hparams: Any = None, **options: Any) -> Options:
        """Validate keyword options (``transform(..., **options)``) into ``Options``."""
        names = {"roles", "trainable_norms", "reinit", "fp8"}
        unknown = sorted(set(options) - names)
        if unknown:
            raise UmupError(
                f"Unknown umup_fx option(s) {unknown}; known: hparams, {', '.join(sorted(names))}."
            )
        fp8 = options.pop("fp8", "off")
        if fp8 is True:
            fp8 = "auto"
        elif fp8 is False or fp8 is None:
            fp8 = "off"
        if fp8 not in FP8_MODES:
            raise UmupError(f"fp8={fp8!r}: use True / False or one of {FP8_MODES}.")
        return cls(hparams=HParams.coerce(hparams), fp8=fp8, **options)
