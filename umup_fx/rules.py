"""The u-muP rule table (``docs/rules.md``), as code a reader can check line by line.

Everything numeric that u-muP prescribes lives here: weight roles (§1), the per-op
scales (§3), the residual tau rule (§4) and the optimizer's LR factors (§5). Passes
decide *which* rule applies where; this module says *what* the rule computes.
"""

from __future__ import annotations

import math

from umup_fx.hparams import HParams

# -- §1 weight roles ------------------------------------------------------------------
INPUT, HIDDEN, OUTPUT, FIXED_ROLE, BIAS, NORM, UNUSED = (
    "input",
    "hidden",
    "output",
    "fixed",
    "bias",
    "norm",
    "unused",
)
ROLES = (INPUT, HIDDEN, OUTPUT, FIXED_ROLE, BIAS, NORM, UNUSED)


def weight_role(fan_in_is_width: bool, fan_out_is_width: bool) -> str:
    """§1's table: (fan_in, fan_out) width-like or fixed -> role."""
    return {
        (False, True): INPUT,
        (True, True): HIDDEN,
        (True, False): OUTPUT,
        (False, False): FIXED_ROLE,
    }[(fan_in_is_width, fan_out_is_width)]


# -- §2 initialisation ----------------------------------------------------------------
WEIGHT_ROLES = (INPUT, HIDDEN, OUTPUT, FIXED_ROLE)


def init_of(role: str, shift: bool = False) -> str:
    """§2: weights N(0, 1), biases 0, norm gains 1 (norm shifts 0); unused kept."""
    if role in WEIGHT_ROLES:
        return "normal"
    if role == BIAS or (role == NORM and shift):
        return "zeros"
    if role == NORM:
        return "ones"
    return "keep"


# -- §3 ops the rewrite scales (the values of node.meta["umup"]["rule"]) ---------------
LINEAR = "linear"
EMBEDDING = "embedding"  # also ``W[ids]``: an integer lookup of a parameter's rows
CONV = "conv"  # conv1d/2d/3d: the linear rule with fan_in = C_in/groups * prod(kernel)
PICK = "pick"  # one position of a sequence read by a head (ViT's cls token): grad x sqrt(n)
POOL = "pool"  # average pooling / a mean over activation axes: x sqrt(n), grad tied
NORM_OP = "norm"  # layer_norm / rms_norm or the decomposed x * rsqrt(mean(x^2) + eps)
NORM_GAIN = "norm_gain"  # the normalised value times its 1-D gain
RESIDUAL_ADD = "residual_add"
ADD = "add"
TABLE_SUM = "table_sum"  # a sum of n embedding lookups (BERT, GPT-2): x n^-1/2, grads untied
SDPA = "sdpa"
ATTENTION = "attention"  # hand-written q @ k^T * c -> softmax -> @ v, rewritten as SDPA's rule
SOFTMAX = "softmax"
SILU = "silu"
GELU = "gelu"
ACTIVATION = "activation"  # relu, tanh, sigmoid, quick-GELU, ...: the exact Gaussian std
GATED = "gated"  # up * act(gate): SiLU (reference rule) or any ACTIVATION / GELU
SOFTCAP = "softcap"  # c * tanh(x / c) (Gemma 2): the identity at u-muP's O(1) logits
MODEL_SCALE = "model_scale"  # a model's own constant on an embedding / before a readout
GATE_ACT = "gate_act"  # the SiLU inside a gated unit (scaled by GATED)
PATTERN_PART = "pattern_part"  # inside a recognised pattern (tanh-GELU, attention dropout)
DROPOUT = "dropout"
ROUTER = "router"  # an MoE router's softmax / sigmoid: gate weights, kept as the model's
MOE_COMBINE = "moe_combine"  # experts' outputs x gates: x 1 / (g0 sqrt(k)), tied (§10)
MATMUL = "matmul"
CROSS_ENTROPY = "cross_entropy"
BCE_LOGITS = "bce_logits"  # binary cross-entropy with logits: the two-class cross-entropy


def interp(alpha: float, lower: float, upper: float) -> float:
    """Log-linear blend: exp(alpha ln upper + (1 - alpha) ln lower)."""
    return math.exp(alpha * math.log(upper) + (1 - alpha) * math.log(lower))


# -- §4 residual tau ----------------------------------------------------------------
def residual_taus(kinds: list[str], hp: HParams) -> list[float]:
    """tau_i for a sequence of residual branches ("attention" / "mlp"), in forward order.

    §4 with 2L = the number of branches: tau_i = alpha_i / sqrt(n/2 + sum_{j<i} alpha_j^2).
    For a transformer (alternating attention and MLP) this is exactly the paper's rule;
    a stack of one kind of branch uses the same formula with its own sequence.
    """
    alpha_mlp = hp.residual_mult * math.sqrt(2 / (1 + hp.residual_attn_ratio**2))
    alpha_attn = hp.residual_attn_ratio * alpha_mlp
    taus, acc = [], len(kinds) / 2
    for kind in kinds:
        alpha = alpha_attn if kind == "attention" else alpha_mlp
        taus.append(alpha / math.sqrt(acc))
        acc += alpha**2
    return taus


def depth_of(kinds: list[str]) -> int:
    """L, the number of residual blocks of one stream: blocks end in an MLP when both
    kinds occur (attention+MLP, or self- + cross-attention + MLP), else one branch each."""
    n_attn = sum(k == "attention" for k in kinds)
    n_mlp = len(kinds) - n_attn
    return min(n_attn, n_mlp) if n_attn and n_mlp else len(kinds)


def stream_taus(kinds: list[str], streams: list[int], hp: HParams) -> tuple[list[float], int]:
    """tau of every branch and the depth L, for branches on one or more residual streams
    (an encoder-decoder has two): each stream gets §4's rule on its own branches, and L
    is the deepest stream's."""
    taus = [0.0] * len(kinds)
    depth = 0
    for stream in dict.fromkeys(streams):
        idx = [i for i, s in enumerate(streams) if s == stream]
        for i, tau in zip(idx, residual_taus([kinds[i] for i in idx], hp), strict=True):
            taus[i] = tau
        depth = max(depth, depth_of([kinds[i] for i in idx]))
    return taus, depth


# -- §5 optimizer -------------------------------------------------------------------
def lr_factor(
    role: str, fan_in: int | None, fan_out: int | None, depth_scaled: bool, depth: int
) -> float:
    """The factor that multiplies the global eta for one parameter (Adam / AdamW)."""
    if role == INPUT:
        factor = fan_out**-0.5
    elif role == HIDDEN:
        factor = fan_in**-0.5
    else:  # output, fixed, bias, norm, unused
        factor = 1.0
    if depth_scaled and depth > 0:
        factor *= depth**-0.5
    return factor


def lr_rule_text(role: str, depth_scaled: bool) -> str:
    """The §5 rule in words, for the report."""
    base = {INPUT: "eta/sqrt(fan_out)", HIDDEN: "eta/sqrt(fan_in)"}.get(role, "eta")
    return base + ("/sqrt(L)" if depth_scaled else "")
