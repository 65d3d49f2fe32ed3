"""The one place where umup_fx's FX metadata keys are defined and documented.

Every fact a pass derives is stored under a single namespace, ``node.meta["umup"]``
(per node) or ``gm.meta["umup"]`` (per graph), and each key is written by exactly one
pass. Passes read and write through the helpers below, never through string literals.

Per-node keys (``node.meta["umup"][KEY]``):

=================  =================  ==================================================
key                written by         value
=================  =================  ==================================================
``kind``           capture            placeholders only: "param" | "buffer" |
                                      "constant" | "input"
``direct``         passes.match       on parameter placeholders used as values, not
                                      weights (position tables, cls tokens): dict
                                      {"kind": "add" | "expand" | "cat" | "norm", "op",
                                      "operand"}
``param``          capture            placeholders of parameters: the canonical
                                      parameter name (first name in
                                      ``model.named_parameters()``; tied names share it)
``dims``           passes.dims        tuple of sympy expressions, one per tensor axis
                                      (a list of tuples for multi-output ops)
``norm``           passes.norms       True on nodes whose value is a normalisation
                                      output (the op, or the op times its gain)
``rule``           passes.match         the u-muP rule this op gets (see ``Rule``)
``weight``         passes.match        for weight-bearing ops: the parameter name
``transposed``     passes.match       on weight ops: True when the weight *operand* is
                                      [..., in, out] (``addmm`` / ``matmul`` / ``bmm``)
``einsum``         passes.match       on einsum weight ops: (operand subscripts,
                                      output subscripts, index of the weight operand)
``grouped``        passes.match       on MoE expert matmuls (``_grouped_mm`` or
                                      transformers' fallback): the op's schema name
``moe``            passes.moe         on the top-k combine of routed experts: dict
                                      {"scale", "k", "experts", "gate_at_init",
                                      "normalized", "router", "sum"}; "router" (and
                                      "grad_at_init", its logits' gradient RMS at
                                      init) on the router's linear and its softmax /
                                      sigmoid
``gate``           passes.match       on gated units: the activation node it absorbs
``activation``     passes.match       on "activation" / "gated" nodes: (kind, kwargs)
                                      for ``ops.activation`` / ``ops.glu``
``gelu_input``     passes.match       on a hand-written activation's output (tanh-GELU,
                                      quick-GELU, ReLU^2): its input
``attention``      passes.match        for ``rule == "attention"`` patterns: dict with
                                      the pattern's nodes and whether it is causal
``residual``       passes.residuals   on residual adds: ``Branch`` (index, kind, tau)
``broadcast``      passes.residuals   on plain adds whose operands differ in shape: per
                                      operand, True when it is broadcast and has its
                                      own path (its summed gradient is brought back
                                      to unit, rules §3 "Plain add")
``keeps_scale``    passes.residuals   on adds of two activations that need no rule:
                                      "rotation" (RoPE's mix) | "low-rank update" (LoRA)
``fp8``            passes.fp8         on linears: True when FP8-eligible (rules §7)
``multiplier``     passes.mup         on the multiply μP puts after a readout: the
                                      readout op's node name (its output is the product)
``weight_norm``    passes.weight_norm on ``aten._weight_norm(v, g, dim)`` of two parameters:
                                      dict {"v", "g" (parameter names), "n" (elements
                                      each norm runs over: v.numel() / g.numel())}
``norm_scale``     passes.scale_norms pretrained import only, on the placeholders it adds:
                                      the path of the 0-dim buffer holding a norm's
                                      input factor (``passes.cut_regions`` feeds it)
=================  =================  ==================================================

Per-graph keys (``gm.meta["umup"][KEY]``):

=================  =================  ==================================================
``solver``         passes.dims        the ``DimSolver`` holding symbols and their kinds
``hparams``        pipeline           the ``HParams`` in force
``params``         capture            {canonical name: ParamInfo(shape, aliases, node)}
``branches``       passes.residuals   list of ``Branch`` in forward order
``depth_scaled``   passes.residuals   set of parameter names inside a residual branch
``uncovered``      passes.coverage    list of (node name, op name, why) left unscaled
``roles``          passes.roles       {parameter name: ParamRole}
``notes``          analysis passes    lines for the report: what the analysis decided
                                      that changes the model's own numbers
``replaced``       passes.scale_norms {erased node name: the node that took its place}
                                      (``passes.cut_regions`` follows it to block outputs)
=================  =================  ==================================================

Per-node keys also carry ``umup.residual`` on the ``residual_split`` that
``passes.scale_residuals`` inserts, so ``passes.cut_regions`` can make its tau a block input.
"""

from __future__ import annotations

from typing import Any

from torch import fx

NAMESPACE = "umup"

# Node keys.
KIND = "kind"
PARAM = "param"
DIMS = "dims"
NORM = "norm"
RULE = "rule"
WEIGHT = "weight"
ATTENTION = "attention"
TRANSPOSED = "transposed"
EINSUM = "einsum"
GROUPED = "grouped"
MOE = "moe"
GATE = "gate"
ACTIVATION = "activation"
DIRECT = "direct"
GELU_INPUT = "gelu_input"
RESIDUAL = "residual"
BROADCAST = "broadcast"
KEEPS_SCALE = "keeps_scale"
FP8 = "fp8"
MULTIPLIER = "multiplier"
NORM_SCALE = "norm_scale"
WEIGHT_NORM = "weight_norm"

# Graph keys.
SOLVER = "solver"
HPARAMS = "hparams"
PARAMS = "params"
BRANCHES = "branches"
DEPTH_SCALED = "depth_scaled"
UNCOVERED = "uncovered"
ROLES = "roles"
PLAN = "plan"
OPTIONS = "options"
TRAINING = "training"
STATIC_MODE = "static_mode"
REPLACED = "replaced"
NOTES = "notes"


def node_meta(node: fx.Node) -> dict[str, Any]:
    """The umup namespace of a node's metadata (created on first use)."""
    return node.meta.setdefault(NAMESPACE, {})


def get(node: fx.Node, key: str, default: Any = None) -> Any:
    return node.meta.get(NAMESPACE, {}).get(key, default)


def graph_meta(gm: fx.GraphModule) -> dict[str, Any]:
    """The umup namespace of a graph module's metadata (created on first use)."""
    return gm.meta.setdefault(NAMESPACE, {})
