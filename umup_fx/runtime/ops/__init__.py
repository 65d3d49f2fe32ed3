"""Runtime ops that a rewritten FX graph calls: the §3 rules of ``docs/rules.md``, one
module per op family. Every op is the plain PyTorch op with two primitives around it,
``scale_fwd`` (forward only) and ``scale_bwd`` (backward only); see ``scaling``.
"""

from __future__ import annotations

from umup_fx.runtime.ops.activations import (
    ACTIVATION_ARGS,
    activation,
    activation_scale,
    dropout,
    gelu,
    glu,
    silu,
    silu_glu,
)
from umup_fx.runtime.ops.adds import (
    add,
    add_tables,
    residual_add,
    residual_split,
)
from umup_fx.runtime.ops.attention import (
    attention_output_scale,
    attention_scales,
    matmul,
    scaled_dot_product_attention,
    softmax,
)
from umup_fx.runtime.ops.linears import (
    broadcast_param,
    combine_experts,
    conv,
    einsum_linear,
    embedding,
    expand_param,
    grouped_linear,
    grouped_op,
    hidden_linear_scales,
    linear,
    linear_grad_scales,
    param_grad_scale,
    readout_linear_scales,
)
from umup_fx.runtime.ops.loss import (
    binary_cross_entropy_with_logits,
    cross_entropy,
    loss_grad_scale,
)
from umup_fx.runtime.ops.normalization import (
    batch_norm,
    group_norm,
    layer_norm,
    norm_eps,
    rms_norm,
    weight_norm,
)
from umup_fx.runtime.ops.pooling import (
    max_pool,
    mean_over,
    pick,
)
from umup_fx.runtime.ops.scaling import (
    data_parallel_size,
    log_interp,
    scale_bwd,
    scale_fwd,
    set_data_parallel_size,
)

__all__ = [
    "ACTIVATION_ARGS",
    "activation",
    "activation_scale",
    "add",
    "add_tables",
    "attention_output_scale",
    "attention_scales",
    "batch_norm",
    "broadcast_param",
    "combine_experts",
    "conv",
    "cross_entropy",
    "binary_cross_entropy_with_logits",
    "data_parallel_size",
    "dropout",
    "einsum_linear",
    "embedding",
    "expand_param",
    "gelu",
    "glu",
    "group_norm",
    "grouped_linear",
    "grouped_op",
    "hidden_linear_scales",
    "layer_norm",
    "linear",
    "linear_grad_scales",
    "log_interp",
    "loss_grad_scale",
    "matmul",
    "max_pool",
    "mean_over",
    "norm_eps",
    "param_grad_scale",
    "pick",
    "readout_linear_scales",
    "residual_add",
    "residual_split",
    "rms_norm",
    "scale_bwd",
    "scale_fwd",
    "scaled_dot_product_attention",
    "set_data_parallel_size",
    "silu",
    "silu_glu",
    "softmax",
    "weight_norm",
]
