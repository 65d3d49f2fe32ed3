"""The scales export folds into the weights, solved from the installed rewritten graphs.

A transformed model T computes each activation as the unit-scaled ops of its region
graphs say; the plain model O (the original class, original code) computes the same
graph with the original ops. Export looks for weights of O such that every activation
of O is a *constant multiple* ``c(n)`` of T's activation at the same node ``n``, and
the model's outputs have ``c = 1``. Each ``log c(n)`` is an affine function of unknowns:
one per weight op (the output scale its folded weight gives, free), fixed by what the
ops between them require:

- a weight op (linear, embedding, conv, einsum, grouped expert matmul) with forward
  scale ``s``: its weight is folded by ``s * c(out) / c(x)``; its output scale is free;
- ops that commute with a constant factor (views, transposes, sums, products with
  buffers, RoPE's rotations) carry it; a product multiplies, an add needs equal factors;
- a normalisation forgets its input's factor (rms/layer norm are scale-invariant up to
  their eps); a pretrained import's norm reads its input's factor from a buffer
  (``passes/scale_norms.py``), which this solve gives its value (``Folding.norm_scales``),
  so its eps is the checkpoint's in effect;
- u-muP's residual add ``(tau f + x) / sqrt(1 + tau^2)`` becomes O's ``x + f``: the
  stream's factor grows by ``sqrt(1 + tau^2)`` and ``f``'s must be ``tau`` times the skip's;
- a nonlinearity ``s f(m x) / m`` (SiLU, GELU, gated units, softmax, loss) needs its
  input at factor ``m`` and gives ``m / s``; SDPA needs ``c(q) c(k)`` to turn O's
  logit scale into u-muP's and gives ``c(v) / s``;
- any other op needs factor 1 on its inputs (it then computes the same values).

The constraints are linear in the logs and solved by least squares, minimum norm (every
free factor as close to 1 as the constraints allow). A constraint left unmet means O's
code cannot express T's scale there: ``ExportError`` names the op and its source line.
Every forward scale is read from the op's arguments in the rewritten graphs, so a change
to a rule changes the export with it; a scale that depends on a run-time size (a
sequence length read from the input) is refused.

Reads: the installed region graphs (``model.region_graphs()``), ``model.original_graph``
(the ops T replaced), the plan's parameters (which norm parameters u-muP froze).
Writes: nothing; returns a ``Folding``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from umup_fx import meta, rules
from umup_fx.errors import UmupError
from umup_fx.passes._graph import module_path
from umup_fx.passes.cut_regions import call_block
from umup_fx.passes.scale_norms import eps_add, normalised_input
from umup_fx.runtime import fp8, ops
from umup_fx.runtime.graph_errors import expect_sizes
from umup_fx.runtime.modules import TENSOR, UmupModule, dtype_limit
from umup_fx.runtime.names import canonical_name, unwrap
from umup_fx.runtime.ops import activations as _act


class ExportError(UmupError):
    """Export or pretrained import cannot be done as asked: the plain model's code cannot
    express a u-muP scale of the transformed model, or the weights are not whole here
    (on meta, or sharded as DTensors)."""


@dataclass
class Folding:
    """What export multiplies each parameter by: ``factors[path]`` per use (one per weight
    op that reads it; tied parameters have several), and the values of the norm
    parameters u-muP froze (gains 1, shifts 0). ``norm_scales[buffer path]``: the factor
    of a pretrained import's norm input (checkpoint / transformed), one per norm and
    block."""

    factors: dict[str, list[tuple[float, str, str]]] = field(default_factory=dict)
    frozen: dict[str, float] = field(default_factory=dict)
    norm_scales: dict[str, float] = field(default_factory=dict)


class _Lin:
    """An affine function of the unknown log-factors: ``const + sum coef[i] * u_i``."""

    __slots__ = ("coef", "const")

    def __init__(self, const: float = 0.0, coef: dict[int, float] | None = None):
        self.const, self.coef = const, dict(coef or {})

    def __add__(self, other: _Lin | float) -> _Lin:
        if not isinstance(other, _Lin):
            return _Lin(self.const + other, self.coef)
        coef = dict(self.coef)
        for k, v in other.coef.items():
            coef[k] = coef.get(k, 0.0) + v
        return _Lin(self.const + other.const, coef)

    def __neg__(self) -> _Lin:
        return _Lin(-self.const, {k: -v for k, v in self.coef.items()})

    def __sub__(self, other: _Lin | float) -> _Lin:
        return self + (-other if isinstance(other, _Lin) else -other)


ZERO = _Lin()


@dataclass(frozen=True)
class _Param:
    """A parameter flowing through the graph (not yet an activation): its full path, and
    the log of the constant the graph multiplies it by before a weight op reads it
    (weight norm's ``sqrt(n)``: the fold goes to ``g``, times that)."""

    path: str
    offset: float = 0.0


_aten = torch.ops.aten


def _packets(*names: str) -> set[Any]:
    out = set()
    for n in names:
        packet = getattr(_aten, n, None)
        if packet is not None:
            out.update(getattr(packet, o) for o in packet.overloads())
    return out


# One activation operand, the factor passes through unchanged (linear in x, or a move).
_CARRY = _packets(
    "view", "_unsafe_view", "reshape", "transpose", "permute", "t", "contiguous", "clone",
    "slice", "select", "unsqueeze", "squeeze", "expand", "flatten", "unflatten", "alias",
    "split", "split_with_sizes", "chunk", "unbind", "repeat", "repeat_interleave",
    "index_select", "gather", "index", "narrow", "flip", "roll", "to", "_to_copy",
    "type_as", "detach", "lift_fresh_copy", "neg", "sum", "mean", "dropout",
    "native_dropout", "lift_fresh", "movedim", "expand_as", "view_as", "reshape_as",
    "_assert_tensor_metadata",
) | {operator.getitem}
_CONCAT = _packets("cat", "stack")  # all operands one factor
_MATMUL = _packets("matmul", "bmm", "mm")  # bilinear: factors multiply
_MUL = _packets("mul") | {operator.mul}
_DIV = _packets("div") | {operator.truediv}
_ADD = _packets("add", "sub")
_SDPA = _packets("scaled_dot_product_attention")
_NORMS = {ops.rms_norm, ops.layer_norm, ops.group_norm}
_NORM_OPS = _packets("layer_norm", "rms_norm")
_WEIGHT_OPS: dict[Callable, tuple[int, int, int | None]] = {
    # op -> (activation arg, weight arg, bias arg)
    ops.linear: (0, 1, 2),
    ops.conv: (0, 1, 2),
    ops.einsum_linear: (1, 2, None),
    ops.grouped_linear: (1, 2, None),
    # FP8's linears: the same scales around a matmul whose casts are numerics only, so
    # export (in the model's dtype) folds them as the plain ones.
    fp8.linear: (0, 1, 2),
    fp8.grouped_linear: (1, 2, None),
}
_PASS_PARAM = {ops.param_grad_scale, ops.broadcast_param, ops.scale_bwd}
_LOG_SQRT2 = 0.5 * math.log(2.0)


_HOMOGENEOUS = ("relu", "leaky_relu")  # f(c x) = c f(x) for every c > 0


def _act_out_scale(node: fx.Node) -> tuple[float, float]:
    """(mult, forward scale s) of an activation / gated-unit op: it computes s f(m x)/m."""
    t, kw = node.target, node.kwargs
    mult = float(kw.get("mult", 1.0))
    if t is ops.silu or t is ops.gelu:
        return mult, _act._act_scales(mult, 1.0, True)[0]
    if t is ops.silu_glu:
        return mult, ops.log_interp(1 / (1 + 1 / mult**2), lower=2.0, upper=2**0.5)
    fn_kwargs = {k: v for k, v in kw.items() if k != "mult"}
    kind = node.args[1] if t is ops.activation else node.args[2]
    return mult, ops.activation_scale(kind, mult=mult, gated=t is ops.glu, **fn_kwargs)


def _where(node: fx.Node, region: str) -> str:
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip()]
    src = f"; source: {lines[-1]}" if lines else ""
    return f"{node.name} ({node.target if isinstance(node.target, str) else getattr(node.target, '__name__', node.target)}) in {region or 'the root'}{src}"


class _Solver:
    def __init__(self, model: UmupModule):
        self.model = model
        self.original = {n.name: n for n in model.original_graph.graph.nodes}
        # Every name of a parameter -> its first (a tied weight is one parameter).
        first: dict[int, str] = {}
        self.canonical: dict[str, str] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            self.canonical[canonical_name(name)] = first.setdefault(id(p), canonical_name(name))
        self.shift = self.dropped_constants()
        self.unknowns: list[str] = []
        self.rows: list[tuple[_Lin, str]] = []  # each must be 0
        # (param path, log factor, op, path of the module whose forward runs the op)
        self.uses: list[tuple[str, _Lin, str, str]] = []
        self.current = ""  # the op being read (its module path)
        self.quiet = False  # reading an op whose value only feeds a norm's statistics
        self.template = self.prefix = ""
        self.frozen = {name for name, p in model.umup_plan.params.items() if p.frozen_by_umup}
        self.gains: list[tuple[str, _Lin, float]] = []  # (frozen gain, its log value, offset)
        self.buffers: dict[fx.Node, str] = {}  # buffer placeholder -> its full path
        self.norm_scales: list[tuple[str, _Lin]] = []  # (norm's buffer, its input's factor)

    # -- bookkeeping --------------------------------------------------------------
    def unknown(self, label: str) -> _Lin:
        self.unknowns.append(label)
        return _Lin(0.0, {len(self.unknowns) - 1: 1.0})

    def require(self, expr: _Lin, why: str) -> None:
        if not self.quiet:
            self.rows.append((expr, why))

    def fold(self, ref: Any, expr: _Lin, op: str) -> None:
        if isinstance(ref, _Param):
            self.uses.append((ref.path, expr + ref.offset, op, self.current))

    def frozen_gain(self, n: fx.Node) -> tuple[str, float] | None:
        """(this region's name of the frozen gain the original model multiplies norm
        ``n`` by, 1 for a ``1 + w`` gain else 0), or None."""
        orig = self.original.get(n.name)
        if orig is None:
            return None
        gain = None
        if orig.target in _NORM_OPS:  # F.layer_norm / F.rms_norm(x, shape, weight, ...)
            gain = orig.args[2] if len(orig.args) > 2 else orig.kwargs.get("weight")
        else:  # x * rsqrt(...), then (through casts) * gain
            node = orig
            while len(node.users) == 1 and next(iter(node.users)).target in _CARRY:
                node = next(iter(node.users))
            for u in node.users:
                if u.target in _MUL:
                    gain = next((a for a in u.args if a is not node), None)
        offset = 0.0
        while isinstance(gain, fx.Node) and gain.op == "call_function":
            if gain.target in _ADD and 1 in gain.args:  # Gemma's (1 + w)
                offset = 1.0
                gain = next(a for a in gain.args if isinstance(a, fx.Node))
            elif gain.target in _CARRY:
                gain = gain.args[0]
            else:
                return None
        name = meta.get(gain, meta.PARAM) if isinstance(gain, fx.Node) else None
        if not name or not name.startswith(self.template):
            return None
        full = self.canonical.get(self.prefix + name[len(self.template):])
        return (full, offset) if full in self.frozen else None

    def norm_scale(self, n: fx.Node, get: Callable) -> None:
        """Record the factor of norm ``n``'s input where it reads one from a buffer."""
        if n.target in _NORMS:
            scale = n.kwargs.get("input_scale")
        else:
            add = eps_add(n)
            eps = [a for a in (add.args if add is not None else ())
                   if isinstance(a, fx.Node) and a.target is ops.norm_eps]
            scale = eps[0].args[1] if eps else None
        if scale in self.buffers:
            x = get(normalised_input(n))  # a parameter normalised as it is: factor 1
            self.norm_scales.append((self.buffers[scale], x if isinstance(x, _Lin) else ZERO))

    def dropped_constants(self) -> dict[str, float]:
        """{node name: log of the constant O multiplies it by that T dropped}: a model's
        own embedding multiplier (Gemma's sqrt(d)) or readout-input scale (T5's
        d^-1/2), which u-muP's rules replace (passes/model_scales.py)."""
        kept = {n.name for gm in self.model.region_graphs().values() for n in gm.graph.nodes}
        buffers = {"b_" + canonical_name(name).replace(".", "_"): b
                   for name, b in self.model.named_buffers()}
        shift: dict[str, float] = {}
        for d in self.original.values():
            if d.op != "call_function" or d.name in kept or not (d.target in _MUL or d.target in _DIV):
                continue
            xs = [a for a in d.args[:2] if isinstance(a, fx.Node) and a.name in kept
                  and a.op != "placeholder" and _numel(a) != 1]
            users = [u for u in d.users if "_assert" not in str(u.target)]
            if (len(xs) != 1 or len(xs[0].users) != 1 or not users
                    or any(u.name not in kept for u in users)):
                continue  # not replaced by its operand (an erased gain, a dead op)
            other = next(a for a in d.args[:2] if a is not xs[0])
            if isinstance(other, fx.Node) and _numel(other) != 1:
                continue  # a tensor, not a constant (a norm's gain)
            k = _constant_value(other, buffers)
            if k is None or k <= 0:
                raise ExportError(
                    f"export cannot read the constant that u-muP dropped at {_where(d, '')} "
                    "(not a number or a one-element buffer); the plain model multiplies by it.")
            shift[xs[0].name] = (1.0 if d.target in _MUL else -1.0) * math.log(k)
        return shift

    # -- one region -----------------------------------------------------------------
    def region(self, module: nn.Module, path: str, inputs: list[Any]) -> list[Any]:
        """Factors of the outputs of ``module``'s graph (flattened as ``call_block``
        returns them) given its flattened call leaves' factors."""
        rg = module.__dict__["_umup_region"]
        values: dict[fx.Node, Any] = {}
        placeholders = [n for n in rg.gm.graph.nodes if n.op == "placeholder"]
        prefix = f"{path}." if path else ""
        outer = self.template, self.prefix  # restored on return (a block inside the root)
        # Where the (shared) graph was captured: a block past the prefix runs its
        # template's graph, whose nodes name the template's parameters.
        self.template, self.prefix = (f"{rg.name}." if path else ""), prefix
        for node, (kind, target) in zip(placeholders, rg.inputs, strict=True):
            if kind == "input":
                values[node] = inputs[target]
            elif kind == "param":
                name = canonical_name(prefix + target)
                values[node] = _Param(self.canonical.get(name, name))
            elif kind == "buffer" or kind == "constant":
                values[node] = ZERO
                if kind == "buffer":
                    self.buffers[node] = canonical_name(prefix + target)
            elif kind == "taus":
                values[node] = list(module.__dict__["_umup_taus"])
            else:
                values[node] = None
        memo: dict[fx.Node, Any] = dict(values)

        def get(n: Any) -> Any:
            if isinstance(n, fx.Node):
                return memo.get(n)
            if isinstance(n, (list, tuple)):
                return [get(a) for a in n]
            return None

        inside = _norm_inputs(rg.gm)
        for n in rg.gm.graph.nodes:
            if n.op == "call_function":
                self.quiet = n in inside
                memo[n] = self.node(n, get, path, module)
                self.quiet = False
                if n.name in self.shift and isinstance(memo[n], _Lin):
                    memo[n] = memo[n] + self.shift[n.name]  # O multiplies it by its constant
        out = next(n for n in rg.gm.graph.nodes if n.op == "output")
        results = list(out.args[0])
        user = [get(r) for r, (kind, _) in zip(results, rg.outputs, strict=True) if kind == "user"]
        if rg.out_leaves:
            it = iter(user)
            user = [next(it) if v is TENSOR else None for v in rg.out_leaves]
        self.template, self.prefix = outer
        return user

    def actual(self, v: Any, node: fx.Node, path: str) -> _Lin | None:
        """An operand as an activation factor: a parameter read as a value keeps its
        weights (factor 1)."""
        if isinstance(v, _Param):
            self.fold(v, ZERO, _where(node, path))
            return ZERO
        return v if isinstance(v, _Lin) else None

    def node(self, n: fx.Node, get: Callable, path: str, module: nn.Module) -> Any:
        t = n.target
        where = _where(n, path)
        self.current = module_path(n, default=path)  # the module whose forward runs it
        if n.op != "call_function":
            raise ExportError(f"export cannot read {where}: a {n.op} node")
        if t is call_block:
            _, sub, args, kwargs = n.args[:4]
            leaves = pytree.tree_leaves((tuple(args), dict(kwargs)))
            flat = [get(x) if isinstance(x, fx.Node) else None for x in leaves]
            block = unwrap(module.get_submodule(sub))
            return self.region(block, canonical_name(f"{path}.{sub}" if path else sub), flat)
        if t in _NORMS or meta.get(n, meta.RULE) == rules.NORM_OP:
            # Scale-invariant: the input's factor is forgotten (but for an imported
            # norm's buffer). A gain u-muP froze is the plain model's to set: its value
            # is the output's factor.
            self.norm_scale(n, get)
            gain = self.frozen_gain(n)
            if gain is None:
                return ZERO
            out = self.unknown(where + " (gain)")
            self.gains.append((gain[0], out, gain[1]))
            return out
        args = [get(a) for a in n.args]
        kwargs = {k: get(v) for k, v in n.kwargs.items()}
        if t is operator.getitem and isinstance(args[0], (list, tuple)):
            v = args[0][n.args[1]]
            return v
        if t in _WEIGHT_OPS:
            xi, wi, bi = _WEIGHT_OPS[t]
            x = self.actual(args[xi], n, path)
            s = math.log(float(n.kwargs["out_scale"]))
            out = self.unknown(where)
            self.fold(args[wi], out + s - x, where)
            if bi is not None and len(n.args) > bi:
                self.fold(args[bi], out + s, where + " (bias)")
            return out
        if t is ops.embedding:
            out = self.unknown(where)
            self.fold(args[1], out, where)
            return out
        if t in (ops.broadcast_param, ops.expand_param) and isinstance(args[0], _Param):
            out = self.unknown(where)
            self.fold(args[0], out, where)
            return out
        if t in _PASS_PARAM:
            return args[0]
        if t is ops.residual_split:
            return [args[0], args[0]]
        if t is ops.residual_add:
            f, skip, tau = self.actual(args[0], n, path), self.actual(args[1], n, path), args[2]
            tau = n.args[2] if tau is None else tau
            if not isinstance(tau, (int, float)):
                raise ExportError(f"export needs a constant tau at {where}")
            out = skip + math.log((1 + tau**2) ** 0.5)
            self.require(f - (out + math.log(tau / (1 + tau**2) ** 0.5)), where)
            return out
        if t is ops.add_tables:  # T = sum / sqrt(n): O's plain sum, all at one factor
            first, *rest = (self.actual(v, n, path) for v in args)
            if first is None or None in rest:
                raise ExportError(f"export needs every table of the sum at {where} to be "
                                  "an activation")
            for v in rest:
                self.require(v - first, where)
            return first + 0.5 * math.log(len(args))
        if t is ops.add:
            a, b = (self.actual(v, n, path) for v in args[:2])
            if a is None or b is None or _numel(n.args[0]) == 1 or _numel(n.args[1]) == 1:
                for v in (a, b):
                    if v is not None:
                        self.require(v, where)
                return ZERO
            self.require(a - b, where)
            return a + _LOG_SQRT2
        if t is ops.activation and n.args[1] in _HOMOGENEOUS:
            # f(c x) = c f(x) for c > 0: any factor passes (T = s f(x), whatever mult)
            return self.actual(args[0], n, path) - math.log(_act_out_scale(n)[1])
        if t in (ops.silu, ops.gelu, ops.activation):
            mult, s = _act_out_scale(n)
            self.require(self.actual(args[0], n, path) - math.log(mult), where)
            return _Lin(math.log(mult / s))
        if t in (ops.silu_glu, ops.glu):
            mult, s = _act_out_scale(n)
            up, gate = self.actual(args[0], n, path), self.actual(args[1], n, path)
            self.require(gate - math.log(mult), where)
            return up + math.log(mult / s)
        if t is ops.dropout:
            p = n.args[1] if len(n.args) > 1 else n.kwargs.get("p", 0.5)
            return self.actual(args[0], n, path) - math.log((1 - p) ** 0.5)
        if t is ops.scaled_dot_product_attention:
            return self.sdpa(n, args, path, where)
        if t is ops.scale_fwd:
            s = args[1] if isinstance(args[1], float) else n.args[1]
            if not isinstance(s, (int, float)):
                raise ExportError(f"export needs a constant forward scale at {where} (got "
                                  f"{s}); it depends on a run-time size")
            return self.actual(args[0], n, path) - math.log(s)  # T = s x: O / T = c / s
        if t is ops.attention_output_scale:  # s of a hand-written attention: a number
            if any(isinstance(a, fx.Node) for a in (*n.args, *n.kwargs.values())):
                return None  # from a run-time size: scale_fwd refuses it
            return float(t(*n.args, **n.kwargs))
        if t is dtype_limit or t is ops.norm_eps:
            return None  # finfo(dtype).min / max, an eps: a number in both models
        if t is expect_sizes:
            return None  # a check of an input's shape (capture's fixed sizes): no value
        if t is ops.combine_experts:
            e, g = self.actual(args[0], n, path), self.actual(args[1], n, path)
            return e + g - math.log(float(n.kwargs["scale"]))  # T = scale e g
        if t is ops.cross_entropy:
            mult = float(n.kwargs.get("mult", 1.0))
            self.require(self.actual(args[0], n, path) - math.log(mult), where)
            return ZERO
        if t is ops.softmax:
            return self.softmax(n, args, path, where)
        if t is ops.matmul:
            k = _static_size(n.args[0], -1)
            if k is None:
                raise ExportError(f"export needs a static inner size at {where}")
            a, b = self.actual(args[0], n, path), self.actual(args[1], n, path)
            return a + b - 0.5 * math.log(k)
        if t is ops.weight_norm:
            return self.weight_norm(n, args, where)
        if t in (ops.mean_over, ops.max_pool):  # the plain forward (grad-only scales);
            return self.actual(args[0], n, path)  # a mean or a max carries a positive factor
        if getattr(t, "__module__", "").startswith("umup_fx"):
            raise ExportError(
                f"export does not know how to fold the u-muP op {where}; the plain model "
                "would compute something else there. Keep the transformed model for "
                "inference, or report the op.")
        return self.aten(n, args, kwargs, path, where)

    def weight_norm(self, n: fx.Node, args: list, where: str) -> _Param:
        """T's weight is ``sqrt(n) g v / ||v||``, O's ``g v / ||v||``: whatever factor the
        weight op folds into the weight goes to ``g``, times ``sqrt(n)``; ``v`` is kept
        (its scale cancels). A gain u-muP keeps out of the graph is found by its name
        (O's value then is the factor itself: frozen gains are set to 1 first)."""
        found = meta.get(n, meta.WEIGHT_NORM) or {}
        g = args[1] if len(args) > 1 else None
        if not isinstance(g, _Param):
            name = found.get("g")
            if not isinstance(name, str) or not isinstance(args[0], _Param):
                raise ExportError(f"export cannot find the gain of the weight norm at {where}")
            if self.template and name.startswith(self.template):
                name = name[len(self.template):]  # the shared graph's block -> this block
            local = canonical_name(self.prefix + name)
            g = _Param(self.canonical.get(local, local))
        count = n.kwargs.get("n") or found.get("n")
        if not isinstance(count, int):
            raise ExportError(f"export needs the weight norm's size at {where}")
        return _Param(g.path, g.offset + 0.5 * math.log(count))

    def sdpa(self, n: fx.Node, args: list, path: str, where: str) -> _Lin:
        seq_len = n.kwargs.get("seq_len")
        if not isinstance(seq_len, int):
            raise ExportError(
                f"export cannot fold the attention output scale at {where}: it is computed "
                "from each call's sequence length, which no plain model's weights can "
                "express. A transform whose attention scale is fixed at a reference length "
                "(seq_len in the op) is needed.")
        q, k, v = (self.actual(a, n, path) for a in args[:3])
        d_head = _static_size(n.args[2], -1)
        dq = _static_size(n.args[0], -1)
        mult = float(n.kwargs.get("mult", 1.0))
        causal = bool((n.args[5] if len(n.args) > 5 else n.kwargs.get("is_causal", False))
                      or n.kwargs.get("causal_mask", False))
        p = n.args[4] if len(n.args) > 4 else n.kwargs.get("dropout_p", 0.0)
        logit, s = ops.attention_scales(d_head, seq_len, causal=causal, mult=mult, dropout_p=p)
        orig = self.original.get(n.name)
        o_scale = None
        if orig is not None and orig.target in _SDPA:
            o_scale = orig.kwargs.get("scale")
        if o_scale is None:
            o_scale = dq**-0.5
        if len(n.args) > 3 and n.args[3] is not None:
            self.require(self.actual(args[3], n, path) or ZERO, where + " (mask)")
        self.require(q + k + math.log(o_scale) - math.log(logit), where)
        return v - math.log(s)

    def softmax(self, n: fx.Node, args: list, path: str, where: str) -> _Lin:
        size = n.kwargs.get("n")
        if not isinstance(size, int):
            raise ExportError(f"export cannot fold the softmax scale at {where}: it is "
                              "computed from each call's size. A transform with a fixed "
                              "reference size (n in the op) is needed.")
        mult = float(n.kwargs.get("mult", 1.0))
        a = 1 / (1 + 4 / mult**2)
        s = ops.log_interp(a, lower=size, upper=size**0.5)
        self.require(self.actual(args[0], n, path) - math.log(mult), where)
        return _Lin(-math.log(s))

    def aten(self, n: fx.Node, args: list, kwargs: dict, path: str, where: str) -> Any:
        t = n.target
        if not _is_tensor(n.meta.get("val")):
            return None  # a size, a flag: read from shapes, equal in both models
        flat = pytree.tree_leaves((args, kwargs), is_leaf=lambda v: isinstance(v, (_Lin, _Param)))
        if not any(isinstance(v, (_Lin, _Param)) for v in flat):
            return _multi(n, ZERO)
        if t in _CARRY:  # other operands are indices, sizes, a dtype: not scaled
            first = args[0]
            if isinstance(first, _Param):
                return first
            return _multi(n, self.actual(first, n, path) or ZERO)
        if t in _MATMUL:
            a, b = (self.actual(v, n, path) for v in args[:2])
            return (a or ZERO) + (b or ZERO)
        if t in _CONCAT:
            parts = [self.actual(v, n, path) for v in (args[0] or []) if v is not None]
            for p in parts[1:]:
                self.require(p - parts[0], where)
            return parts[0] if parts else ZERO
        if t in _MUL or t in _DIV:
            a, b = (self.actual(v, n, path) if isinstance(v, (_Lin, _Param)) else None
                    for v in args[:2])
            a, b = a or ZERO, b or ZERO
            return (a + b if t in _MUL else a - b) + self.constant_change(n)
        if t in _ADD and len(args) >= 2:
            a, b = (self.actual(v, n, path) if isinstance(v, (_Lin, _Param)) else None
                    for v in args[:2])
            if a is not None and b is not None:
                self.require(a - b, where)
                return a
            return self._same(a if a is not None else b, where)
        for v in list(args) + list(kwargs.values()):
            leaves = v if isinstance(v, (list, tuple)) else [v]
            for leaf in leaves:
                lin = self.actual(leaf, n, path)
                if lin is not None:
                    self.require(lin, where)
        return _multi(n, ZERO)

    def constant_change(self, n: fx.Node) -> float:
        """log(O's value / T's) of a multiply / divide by a number that the rewrite set
        (a hand-written attention's logit scale: the model's 1/sqrt(d_head) became
        u-muP's 1/d_head) or inserted (O has no such op)."""
        k = next((a for a in n.args[:2] if isinstance(a, (int, float))), None)
        if k is None or k == 0:
            return 0.0
        k_orig = None  # an inserted node: O has no such op
        if not _inserted(n):
            orig = self.original.get(n.name)
            if orig is None or orig.target != n.target:
                return 0.0
            k_orig = next((a for a in orig.args[:2] if isinstance(a, (int, float))), None)
            if k_orig is None:  # the original multiplied by a tensor there: the same op
                return 0.0
        sign = 1.0 if n.target in _MUL else -1.0
        o = 0.0 if k_orig is None else sign * math.log(abs(k_orig))
        return o - sign * math.log(abs(k))

    def _same(self, v: _Lin, where: str) -> _Lin:
        self.require(v, where)  # x + constant: only at factor 1
        return ZERO


def _norm_inputs(gm: fx.GraphModule) -> set[fx.Node]:
    """The inner ops of each hand-written norm ``x * rsqrt(mean(x^2) + eps)``: the nodes
    between its input ``x`` and its output. The norm forgets x's factor, so the
    statistics' nonlinear ops constrain nothing."""
    inside: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if meta.get(n, meta.RULE) != rules.NORM_OP or n.target in _NORMS:
            continue
        shape = getattr(n.meta.get("val"), "shape", None)
        xs = [a for a in n.all_input_nodes if getattr(a.meta.get("val"), "shape", None) == shape]
        if not xs:
            continue
        above, todo = set(), list(n.all_input_nodes)
        while todo:  # ancestors of the norm output
            a = todo.pop()
            if a not in above:
                above.add(a)
                todo.extend(a.all_input_nodes)
        below, todo = set(), [u for x in xs for u in x.users]
        while todo:  # descendants of x among them
            a = todo.pop()
            if a in above and a not in below:
                below.add(a)
                todo.extend(a.users)
        inside |= below - set(xs)
    return inside


def _constant_value(a: Any, buffers: dict[str, torch.Tensor]) -> float | None:
    """A number, or a one-element buffer (through dtype casts and views), else None."""
    if isinstance(a, (int, float)):
        return float(a)
    while isinstance(a, fx.Node) and a.op == "call_function" and a.target in _CARRY:
        a = a.args[0]
    if isinstance(a, fx.Node) and a.op == "placeholder" and a.name in buffers:
        b = buffers[a.name]
        return float(b) if b.numel() == 1 and not b.is_meta else None
    return None


def _inserted(n: fx.Node) -> bool:
    """A node the rewrite inserted (no source line of the model's own)."""
    return not n.meta.get("stack_trace") and not n.meta.get("nn_module_stack")


def _is_tensor(val: Any) -> bool:
    if isinstance(val, (list, tuple)):
        return any(_is_tensor(v) for v in val)
    return isinstance(val, torch.Tensor)


def _multi(n: fx.Node, value: _Lin) -> Any:
    val = n.meta.get("val")
    if isinstance(val, (list, tuple)):
        return [value] * len(val)
    return value


def _numel(a: Any) -> int | None:
    if not isinstance(a, fx.Node):
        return 1
    val = a.meta.get("val")
    if isinstance(val, torch.Tensor):
        try:
            return int(val.numel())
        except Exception:  # a symbolic size
            return None
    return None


def _static_size(a: Any, dim: int) -> int | None:
    val = a.meta.get("val") if isinstance(a, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        return None
    size = val.shape[dim]
    return size if isinstance(size, int) else None


def _solve(solver: _Solver) -> list[float]:
    """Least squares over the log factors (float64, torch: numpy is not a dependency);
    every constraint must then hold exactly, else the plain code cannot express it."""
    m, k = len(solver.rows), len(solver.unknowns)
    a = torch.zeros((max(m, 1), max(k, 1)), dtype=torch.float64)
    b = torch.zeros(max(m, 1), dtype=torch.float64)
    for i, (expr, _) in enumerate(solver.rows):
        for j, c in expr.coef.items():
            a[i, j] += c
        b[i] = -expr.const
    if k:
        x = torch.linalg.lstsq(a, b.unsqueeze(1), driver="gelsd").solution.squeeze(1)
        resid = a @ x - b
    else:
        x, resid = torch.zeros(0, dtype=torch.float64), -b
    bad = torch.nonzero(resid.abs() > 1e-9).flatten().tolist()
    if bad and m:
        i = int(bad[0])
        raise ExportError(
            f"export cannot express the transformed model's scale at {solver.rows[i][1]}: "
            f"the plain model's code would compute it {math.exp(float(resid[i])):.6g} times "
            "off, and no choice of its weights fixes that (the op sits where a scale "
            "would have to pass through a nonlinearity). Keep the transformed model for "
            "inference there.")
    return x[:k].tolist()


def solve_folding(model: nn.Module, tied: bool = False) -> Folding:
    """The factor of each parameter use and the frozen norm parameters' values of a
    transformed ``model`` (see the module docstring). ``tied``: every use of a parameter
    gets one factor (importing weights into a model whose tied weight is one tensor)."""
    if not isinstance(model, UmupModule):
        raise ExportError(
            f"{type(model).__name__} is not a model transformed by umup_fx.transform; "
            "export only converts transformed models (a plain model needs no export).")
    solver = _Solver(model)
    roots = [x for x in model.__dict__["_umup_region"].inputs if x[0] == "input"]
    outputs = solver.region(model, "", [ZERO] * (1 + max((t for _, t in roots), default=0)))
    for out in outputs:
        if isinstance(out, _Lin):
            solver.require(out, "the model's output")
    if tied:
        first: dict[str, _Lin] = {}
        for path, expr, op, _ in solver.uses:
            if path in first:
                solver.require(expr - first[path], f"{op}, a use of the tied parameter {path!r}")
            first.setdefault(path, expr)
    x = _solve(solver)
    folding = Folding()
    for path, expr, op, owner in solver.uses:
        value = expr.const + sum(c * x[j] for j, c in expr.coef.items())
        folding.factors.setdefault(path, []).append((math.exp(value), op, owner))
    plan = model.umup_plan
    for name, p in plan.params.items():
        if p.frozen_by_umup:
            folding.frozen[name] = 1.0 if p.init == "ones" else 0.0
    for path, expr in solver.norm_scales:
        folding.norm_scales[path] = math.exp(expr.const + sum(c * x[j] for j, c in expr.coef.items()))
    values: dict[str, float] = {}
    for name, expr, offset in solver.gains:  # one value per gain (shared graphs agree)
        value = math.exp(expr.const + sum(c * x[j] for j, c in expr.coef.items())) - offset
        if name in values and not math.isclose(values[name], value, rel_tol=1e-9):
            raise ExportError(f"the frozen gain {name!r} would need two values")
        values[name] = folding.frozen[name] = value
    return folding

