"""Weight roles and fans (§1): input / hidden / output / fixed, bias, norm.

A weight's fan-in and fan-out come from how its op uses it (``linear``: W[out, in];
``addmm`` / ``matmul`` right operand: W[in, out]; ``embedding``: rows are fan-in),
and its role from whether each fan is width-like (``passes.dims``). A tied parameter
(embedding shared with the LM head) keeps every use; its role, init and LR follow
its first use in the forward pass, while each use gets its own op scaling.

Reads: ``umup.dims``, ``umup.rule``, ``umup.weight``, ``umup.transposed``, ``umup.norm``,
``umup.weight_norm``.
Writes: ``gm.meta["umup"]["roles"]``: {parameter name: ``ParamRole``}.
Fails when: a parameter is used by an op no rule covers (``AnalysisError`` naming the
parameter, the op and the source line; ``roles={name: role}`` overrides it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from umup_fx import meta, rules
from umup_fx.errors import AnalysisError

from ._graph import (
    ADDS,
    MULS,
    SPLITS,
    consumers,
    op_name,
    ops,
    param_name,
    source,
    split_part_of,
    where,
)
from .dims import WIDTH

_ADDMM = ops("addmm")
_BATCH_NORM = ops("batch_norm")
_INDEX = ops("index.Tensor")


@dataclass
class Use:
    node: str  # the consuming op's node name
    rule: str  # its rule
    role: str  # the role this use implies


@dataclass
class ParamRole:
    role: str
    fan_in: sp.Expr | None = None
    fan_out: sp.Expr | None = None
    uses: list[Use] = field(default_factory=list)
    shift: bool = False  # a norm parameter that is added (LayerNorm's bias), not multiplied


def _weight_use(op: fx.Node, solver) -> ParamRole:
    """Fans from the weight *operand* as the op sees it (after any ``.T``, view or
    permute the model applies), so stored layout and einsum plumbing do not matter."""
    rule = meta.get(op, meta.RULE)
    if meta.get(op, meta.EINSUM):  # letters W shares with x only: fan_in; with out: fan_out
        subs, out, i = meta.get(op, meta.EINSUM)
        w, x = subs[i], subs[1 - i]
        dims = dict(zip(w, meta.get(op.args[1][i], meta.DIMS), strict=True))
        fan_in = sp.Mul(*[dims[c] for c in w if c in x and c not in out])
        fan_out = sp.Mul(*[dims[c] for c in w if c in out and c not in x])
    elif rule == rules.EMBEDDING:
        dims = meta.get(op.args[0], meta.DIMS)
        fan_in, fan_out = dims[0], dims[1]
    elif meta.get(op, meta.TRANSPOSED):  # x @ W, addmm(b, x, W), bmm: W is [..., in, out]
        dims = meta.get(op.args[2] if op.target in _ADDMM else op.args[1], meta.DIMS)
        fan_in, fan_out = dims[-2], dims[-1]
    else:  # linear(x, W): W is [out, in]
        dims = meta.get(op.args[1], meta.DIMS)
        fan_in, fan_out = dims[1], dims[0]
        whole = split_part_of(source(op.args[1]))
        if whole is not source(op.args[1]):  # a part of a split weight (q | kv of in_proj):
            # width-like when the whole's out axis is, as for a fused QKV projection
            width_out = solver.kind_of(meta.get(whole, meta.DIMS)[0]) == WIDTH
            role = rules.weight_role(solver.kind_of(fan_in) == WIDTH, width_out)
            return ParamRole(role, fan_in, fan_out)
    return _role(fan_in, fan_out, solver)


def _role(fan_in: sp.Expr, fan_out: sp.Expr, solver) -> ParamRole:
    role = rules.weight_role(solver.kind_of(fan_in) == WIDTH, solver.kind_of(fan_out) == WIDTH)
    return ParamRole(role, fan_in, fan_out)


def _direct_role(node: fx.Node, solver) -> ParamRole:
    """A parameter used as a value (position table, cls token, a table read through a
    norm, learned queries): an input weight when its last axis is a width; its other axes
    (positions, tokens, queries) are its fan-in, never a width: nothing sums over them,
    even where no op ties them to a data dim (DeBERTa's relative-position rows)."""
    dims = meta.get(node, meta.DIMS)
    role = rules.weight_role(False, solver.kind_of(dims[-1]) == WIDTH)
    return ParamRole(role, sp.Mul(*dims[:-1]), dims[-1])


def _use_of(node: fx.Node, op: fx.Node, name: str, solver) -> ParamRole | None:
    rule = meta.get(op, meta.RULE)
    dims = meta.get(node, meta.DIMS)
    if rule == rules.CONV and meta.get(op, meta.WEIGHT) == name:
        # W[out, in / groups, *kernel]: the kernel's taps add to fan_in (kernel dims fixed);
        # the fans are one group's, out / groups = out * W[1] / C_in (a depthwise conv's
        # are fixed: its channels are copies, rules.md "Grouped and depthwise convolutions")
        x = meta.get(op.args[0], meta.DIMS)
        per_group_out = dims[0] * dims[1] / x[len(x) - len(dims) + 1]
        return _role(sp.Mul(*dims[1:]), per_group_out, solver)
    if rule in (rules.LINEAR, rules.EMBEDDING) and meta.get(op, meta.WEIGHT) == name:
        if len(dims) == 1:
            return None
        return _weight_use(op, solver)
    if rule in (rules.LINEAR, rules.CONV) and len(dims) == 1:
        return ParamRole(rules.BIAS)  # linear(x, W, b) / addmm(b, x, W) / conv(x, W, b)
    if meta.get(op, meta.WEIGHT_NORM) and source(op.args[1]) is node:
        return ParamRole(rules.NORM)  # a weight norm's g: a gain (rules.md "Weight norm")
    if rule == rules.NORM_OP:
        shift_at = 2 if op.target in _BATCH_NORM else 3  # batch_norm(x, w, b, ...)
        return ParamRole(rules.NORM, shift=len(op.args) > shift_at and op.args[shift_at] is node)
    if rule == rules.NORM_GAIN:
        return ParamRole(rules.NORM, shift=op.target in ADDS)
    if op.target in ADDS and len(dims) == 1 and any(isinstance(a, (int, float)) for a in op.args):
        users = consumers(op)
        if users and all(meta.get(u, meta.RULE) == rules.NORM_GAIN or u.target in _ELEMENTWISE_MUL
                         for u in users):
            # a gain of 1 + w (after a norm or on any activation): w starts at 0, and like
            # every gain u-muP makes it non-parametric (§2, rules.md "per-channel scales")
            return ParamRole(rules.NORM, shift=True)
    if op.target in MULS and sum(d != 1 for d in node.meta["val"].shape) == 1 and any(
            isinstance(a, fx.Node) and a is not node for a in op.args):
        # a per-channel scale of activations (LayerScale, a hand-written gain): a gain,
        # non-parametric under u-muP like every gain (rules.md "per-channel scales")
        return ParamRole(rules.NORM)
    if op.target in ADDS and len(dims) == 1:
        other = [a for a in op.args if a is not node]
        if other and isinstance(other[0], fx.Node) and meta.get(other[0], meta.RULE) == rules.LINEAR:
            return ParamRole(rules.BIAS)  # x @ W + b written by hand
    return None


_NONLINEAR = ops("exp", "log", "softplus", "sigmoid", "tanh", "neg", "pow.Tensor_Scalar",
                 "reciprocal", "sqrt", "rsqrt", "clamp", "abs", "sin", "cos")
_ELEMENTWISE_MUL = ops("mul.Tensor", "div.Tensor")
_ELEMENTWISE_ADD = ops("add.Tensor", "sub.Tensor")
_COPIES = ops("repeat", "tile", "repeat_interleave.self_int", "repeat_interleave.self_Tensor")


def advice(name: str, shape: tuple[int, ...], op: fx.Node) -> str:
    """What to pass as ``roles=`` for a parameter no rule covers, from how it is used.

    A vector (one axis that is not 1) multiplying or shifting activations is a gain or a
    shift: u-muP makes those non-parametric (§2), so ``norm`` / ``bias``. A parameter
    that enters through a nonlinearity of its own (``A_log`` through ``exp``) is not a
    weight: its init and a plain ``eta`` are kept (``unused``). Only a matrix
    multiplying activations is a weight, and ``hidden`` its role.
    """
    vector = sum(d != 1 for d in shape) <= 1
    if op.target in _COPIES and not vector:
        return (f"It is tiled by {op_name(op)} and read as an activation: if it is a set of "
                "learned queries or latents, copy it over the batch only (expand(B, -1, -1) "
                "or repeat(B, 1, 1): umup_fx reads that as an input weight, rules.md "
                "'Learned queries'), and hold every query in the parameter itself.")
    if op.target in _NONLINEAR:
        return (f"It enters through {op_name(op)} of its own value, so it is not a weight: "
                f"pass roles={{{name!r}: 'unused'}} to keep the model's init and train it "
                "at the global eta (as u-muP trains gains and biases).")
    if vector and op.target in _ELEMENTWISE_MUL:
        return (f"It is a per-channel scale (a gain, LayerScale): pass roles={{{name!r}: "
                "'norm'}; u-muP makes gains non-parametric, frozen at 1 (rules §2; "
                "trainable_norms=True trains it from 1).")
    if vector and op.target in _ELEMENTWISE_ADD:
        return f"It shifts activations: pass roles={{{name!r}: 'bias'}} (init 0, eta)."
    if vector:
        return (f"It is a vector: pass roles={{{name!r}: 'norm'}} if it scales activations, "
                "'bias' if it shifts them, 'unused' to keep the model's init.")
    return (f"If it multiplies activations as a weight matrix, pass roles={{{name!r}: "
            "'hidden'} (or input / output / fixed, rules §1); if it is a table read by "
            "value, 'unused' keeps the model's init.")


def _through_splits(ops_: list[fx.Node], node: fx.Node) -> list[fx.Node]:
    """A parameter split into parts (q and kv of nn.MultiheadAttention's in_proj_weight)
    is used by what reads each part; a weight norm's direction ``v`` by what reads the
    normed weight (``passes/weight_norm.py``)."""
    out = []
    for op in ops_:
        if op.target in SPLITS:
            out += _through_splits([u for part in op.users for u in consumers(part)], node)
        elif meta.get(op, meta.WEIGHT_NORM) and source(op.args[0]) is node:
            out += _through_splits(consumers(op), node)
        else:
            out.append(op)
    return out


def assign_roles(gm: fx.GraphModule, overrides: dict[str, str] | None = None) -> PassResult:
    """Give every parameter a role and its fans; see the module docstring."""
    overrides = dict(overrides or {})
    solver = meta.graph_meta(gm)[meta.SOLVER]
    params = meta.graph_meta(gm)[meta.PARAMS]
    roles: dict[str, ParamRole] = {}
    for node in gm.graph.nodes:
        name = param_name(node)
        if name is None or not node.users:
            continue
        found: ParamRole | None = None
        if meta.get(node, meta.DIRECT):
            found = _direct_role(node, solver)
            found.uses.append(Use(meta.get(node, meta.DIRECT)["op"], "direct", found.role))
        for op in [] if found else _through_splits(consumers(node), node):
            use = _use_of(node, op, name, solver)
            if use is None:
                if name in overrides:
                    continue
                if op.target in _INDEX and len(params[name].shape) == 3:
                    raise AnalysisError(
                        f"{name!r} (shape {params[name].shape}) is indexed per token at "
                        f"{where(op)}: stacked expert weights gathered for a batched matmul "
                        "(transformers' experts_implementation='batched_mm'). umup_fx scales "
                        "experts run through grouped matmuls (torch._grouped_mm, or "
                        "transformers' default experts_implementation='grouped_mm') or einsum; "
                        "build the model with one of those."
                    )
                raise AnalysisError(
                    f"Cannot classify parameter {name!r} (shape {params[name].shape}): it is "
                    f"used by {op_name(op)} at {where(op)}, which no u-muP rule covers as a "
                    f"weight, bias or norm gain. {advice(name, params[name].shape, op)} "
                    "Then run umup_fx.check(model, inputs) to see the scales it gives."
                )
            if found is None:
                found = use
            found.uses.append(Use(op.name, meta.get(op, meta.RULE), use.role))
        if found is None:
            found = ParamRole(overrides.get(name, rules.UNUSED))
        roles[name] = found
    for name, role in overrides.items():
        if name not in params:
            raise AnalysisError(
                f"roles= names {name!r}, which is not a parameter of the model. "
                f"Parameters: {', '.join(list(params)[:8])}{' ...' if len(params) > 8 else ''}."
            )
        if role not in rules.ROLES:
            raise AnalysisError(f"roles[{name!r}] = {role!r}: a role is one of {rules.ROLES}.")
        entry = roles.setdefault(name, ParamRole(role))
        entry.role = role
        dims = meta.get(gm.graph.find_nodes(op="placeholder", target=params[name].node)[0], meta.DIMS) \
            if params[name].node else None
        if role in (rules.INPUT, rules.HIDDEN, rules.OUTPUT, rules.FIXED_ROLE) and dims and len(dims) > 1:
            # PyTorch's convention for an op we do not know: W[out, in, *kernel].
            entry.fan_in = entry.fan_in if entry.fan_in is not None else sp.Mul(*dims[1:])
            entry.fan_out = entry.fan_out if entry.fan_out is not None else dims[0]
    for name in params:
        roles.setdefault(name, ParamRole(rules.UNUSED))
    meta.graph_meta(gm)[meta.ROLES] = roles
    return PassResult(gm, False)
