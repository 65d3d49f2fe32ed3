"""What a user can ask of the pipeline, in one frozen object that every pass reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from umup_fx.errors import UmupError
from umup_fx.hparams import HParams

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
        pretrained: keep the function the model's current weights compute: they are
            divided by the scales ``umup_fx.export`` folds in (its inverse), norm gains
            stay trainable (implies ``trainable_norms=True``, ``reinit=False``;
            docs/deploy.md).
        fp8: "off"; "auto" (real FP8 where the GPU has it, simulated elsewhere);
            "simulate" (cast round-trip, any device); "scaled_mm" (real FP8, error
            where the hardware cannot). ``True`` means "auto", ``False`` "off".
        parametrization: "umup" (default), or a baseline from the same analysis:
            "mup", "sp", "sp_emb_lr" (``umup_fx.parametrizations``).
        base: the base model's shapes, for "mup" / "sp_emb_lr" (``transform`` takes
            the base model itself and analyses it).
        sigma_init: μP's init std (the base model's), for "mup".
        check: after ``transform``, measure one forward and backward at init and warn
            (``ScaleWarning``) about values outside the unit band (rules §8); runs where
            cheap (``umup_fx.diagnose.unit_check.cheap``). ``False`` skips it.
    """

    hparams: HParams = field(default_factory=HParams)
    roles: dict[str, str] | None = None
    trainable_norms: bool = False
    reinit: bool = True
    fp8: str = "off"
    parametrization: str = "umup"
    base: Any = None  # parametrizations.BaseShapes of the base model (mup, sp_emb_lr)
    sigma_init: float = 0.02  # mup's init std (the base model's)
    check: bool = True  # transform's unit-scale check (rules §8)
    pretrained: bool = False  # convert the current weights (export's inverse)

    @classmethod
    def build(cls, hparams: Any = None, **options: Any) -> Options:
        """Validate keyword options (``transform(..., **options)``) into ``Options``."""
        names = {"roles", "trainable_norms", "reinit", "fp8", "parametrization", "base",
                 "sigma_init", "check", "pretrained"}
        unknown = sorted(set(options) - names)
        if unknown:
            raise UmupError(
                f"Unknown umup_fx option(s) {unknown}; known: hparams, {', '.join(sorted(names))}."
            )
        if options.get("pretrained"):
            if options.get("trainable_norms") is False or options.get("reinit") is True:
                raise UmupError(
                    "pretrained=True keeps the model's function: its norm gains stay "
                    "trainable and its weights are converted, not re-initialised; drop "
                    "trainable_norms=False / reinit=True.")
            options.update(trainable_norms=True, reinit=False, check=False)
        fp8 = options.pop("fp8", "off")
        if fp8 is True:
            fp8 = "auto"
        elif fp8 is False or fp8 is None:
            fp8 = "off"
        if fp8 not in FP8_MODES:
            raise UmupError(f"fp8={fp8!r}: use True / False or one of {FP8_MODES}.")
        opts = cls(hparams=HParams.coerce(hparams), fp8=fp8, **options)
        check_parametrization(opts.parametrization, opts.base)
        if opts.parametrization != "umup" and opts.pretrained:
            raise UmupError("pretrained=True converts weights to u-muP; baselines keep them as they are.")
        if opts.parametrization != "umup" and fp8 != "off":
            raise UmupError("fp8 is u-muP's static-scale FP8; baselines run in the model's dtype.")
        return opts


PARAMETRIZATIONS = ("umup", "mup", "sp", "sp_emb_lr")
NEEDS_BASE = ("mup", "sp_emb_lr")  # relative to a base width

def check_parametrization(parametrization: str, base: Any) -> None:
    if parametrization not in PARAMETRIZATIONS:
        raise UmupError(f"parametrization={parametrization!r}: use one of {PARAMETRIZATIONS}.")
    if parametrization in NEEDS_BASE and base is None:
        raise UmupError(
            f"parametrization={parametrization!r} is relative to a base width: pass "
            "base=<the same model built at the base width> (fans are read from it)."
        )
