"""The u-muP hyperparameters (rules section 6). All default to 1.0.

The global learning rate eta is the optimizer's (`umup_fx.param_groups(model, lr=...)`),
not a field here: everything in `HParams` changes the forward/backward graph.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from umup_fx.errors import HParamsError


@dataclass(frozen=True)
class HParams:
    """The alpha multipliers of u-muP (paper Table 3). All must be finite and > 0.

    Attributes:
        ffn_act_mult: alpha_ffn_act, the input multiplier of SiLU / GELU (f(alpha x)).
        attn_softmax_mult: alpha_attn_softmax, the attention logit multiplier
            (logits = alpha q.k / d_head).
        residual_mult: alpha_res, the weight of the residual branches vs the skip path.
        residual_attn_ratio: alpha_res_attn_ratio, attention-branch weight relative to
            MLP branches.
        loss_softmax_mult: alpha_loss_softmax, the multiplier of the logits going into
            the cross-entropy softmax.
        output_mult: alpha_out, the readout (LM head) multiplier.
    """

    ffn_act_mult: float = 1.0
    attn_softmax_mult: float = 1.0
    residual_mult: float = 1.0
    residual_attn_ratio: float = 1.0
    loss_softmax_mult: float = 1.0
    output_mult: float = 1.0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise HParamsError(
                    f"HParams.{field.name} must be a number, got {type(value).__name__} "
                    f"{value!r}."
                )
            if not math.isfinite(value) or value <= 0:
                raise HParamsError(
                    f"HParams.{field.name} must be finite and > 0 (u-muP multipliers are "
                    f"scales), got {value!r}. The default is 1.0."
                )
            object.__setattr__(self, field.name, float(value))

    @classmethod
    def coerce(cls, value: HParams | dict[str, float] | None) -> HParams:
        """Accept an `HParams`, a dict of its fields, or None (all defaults)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            names = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(value) - names)
            if unknown:
                raise HParamsError(
                    f"Unknown u-muP hyperparameter(s) {unknown}; known: {sorted(names)}."
                )
            return cls(**value)
        raise HParamsError(f"hparams must be HParams, a dict or None, got {type(value).__name__}.")
