"""Scale tracking: the RMS of every rewritten op's output, its gradient and its inputs.

Unit scaling's claim is checkable: at init every op the rewrite scaled should see
RMS ~1 values and gradients (rules §8), and FP8 is safe while the tensors an FP8
matmul casts stay far inside the format's range. ``op_scales`` measures one
forward + backward of a transformed model without changing it.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx

from umup_fx import meta, rules
from umup_fx.passes._graph import MATMULS, is_grouped_mm, ops, where
from umup_fx.passes.cut_regions import call_block
from umup_fx.runtime import fp8 as fp8_ops
from umup_fx.runtime import modules as module_mod
from umup_fx.runtime import ops as umup_ops
from umup_fx.runtime.modules import UmupModule
from umup_fx.runtime.names import canonical_name, unwrap

_RUNTIME = {fn for m in (umup_ops, fp8_ops) for fn in vars(m).values() if callable(fn)}
# The weight ops of a graph that runs as written (the μP baseline keeps ATen's linears):
# recorded too, so a coordinate check sees every parametrization (rules §8, §9).
_ATEN_WEIGHT_OPS = ops("linear", "embedding", "convolution", "addmm", "einsum") | MATMULS
_EMBEDDING = ops("embedding")


def _recorded(n: fx.Node) -> bool:
    if n.op != "call_function":
        return False
    if n.target in _RUNTIME:
        return True
    return bool(meta.get(n, meta.WEIGHT)) and (
        n.target in _ATEN_WEIGHT_OPS or is_grouped_mm(n.target))


@dataclass
class OpScale:
    """RMS figures of one rewritten op for one step."""

    node: str
    rule: str
    op: str
    out_rms: float
    grad_rms: float | None = None  # RMS of d loss / d output
    in_rms: float | None = None  # RMS of the first tensor input
    weight_rms: float | None = None  # for linear / embedding ops
    weight: str | None = None  # the parameter name, for weight ops
    weight_grad_rms: float | None = None  # RMS of d loss / d weight (the whole parameter)
    role: str | None = None  # the role of this use of the weight (rules §1)
    fan_in: int | None = None  # the first input's last size (a readout's fan_in)
    key_len: int | None = None  # q / k projections: the key length of their attention
    router_grad: float | None = None  # a router: its logits' gradient RMS at init (rules §10)
    key_spread: float = 1.0  # q / k projections: how much their attention's keys and values
    # differ across key positions (1: independent positions; 0: all alike), rules §8
    row_coherence: float = 1.0  # weight ops: |sum_r g_r x_r^T| / sqrt(sum_r |g_r|^2 |x_r|^2)
    lookup_factor: float = 1.0  # embeddings: the weight gradient's predicted RMS over its
    # tokens' gradient's, sqrt(1 - rho + rho * sum_v c_v^2 / N), rules §8
    summed_copies: int = 1  # embeddings broadcast over the batch by a sum of tables: the
    # copies whose gradients its output gradient sums (then also lookup_factor times unit)
    query_coherence: float = 1.0  # v projections: how alike their attention's output
    # gradients are across queries (1: independent; sqrt(queries): all alike), rules §8
    source: str = ""  # the user's source line
    shape: tuple[int, ...] = ()  # the output's shape


def rms(x: Tensor) -> float:
    return float(x.detach().float().pow(2).mean().sqrt())


def _spread(x: Tensor) -> float:
    """RMS of ``x`` about its mean over the key positions (axis -2), relative to its RMS:
    1 for positions independent of each other, 0 when every position is alike."""
    x = x.detach().float()
    total = float(x.pow(2).mean())
    return (float((x - x.mean(-2, keepdim=True)).pow(2).mean()) / total) ** 0.5 if total > 0 else 1.0


def _is_sdpa(node: fx.Node) -> bool:
    return meta.get(node, meta.RULE) == rules.SDPA or (
        node.op == "call_function" and node.target is umup_ops.scaled_dot_product_attention)


def _weight_ops_behind(starts: Any, module: torch.nn.Module | None = None, at: str = "",
                       leave: Callable[[int], list[tuple[str, str]]] | None = None,
                       ) -> list[tuple[str, str]]:
    """The first weight op on each path back from ``starts`` (through reshapes, RoPE,
    casts, q / k norms; never past a residual add), as (module path relative to the
    graph's module, node name): a path back into a submodule's call follows its graph,
    and out of it (``leave(i)``: its call's input leaf i in the caller) where it reaches
    an argument (a q / k norm that is a module of its own)."""
    stack, seen = [a for a in starts if isinstance(a, fx.Node)], set()
    found: list[tuple[str, str]] = []
    inputs = None
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder" and leave is not None and module is not None:
            if inputs is None:  # placeholder -> its call leaf, from the module's graph
                rg = module.__dict__.get("_umup_region")
                phs = [p for p in rg.gm.graph.nodes if p.op == "placeholder"] if rg else []
                inputs = {p: src[1] for p, src in zip(phs, rg.inputs if rg else [], strict=False)
                          if src[0] == "input"}
            if n in inputs:
                found += leave(inputs[n])
            continue
        if n.op != "call_function":
            continue
        call = n.args[0] if n.target is operator.getitem and n.args else None
        if meta.get(n, meta.WEIGHT):
            found.append((at, n.name))
        elif isinstance(call, fx.Node) and call.target is call_block:
            found += _weight_ops_in_call(call, n.args[1], module, at)
        elif meta.get(n, meta.RULE) != rules.RESIDUAL_ADD:  # through q/k norms (Qwen3)
            stack.extend(n.all_input_nodes)
    return found


def _weight_ops_in_call(call: fx.Node, leaf: int, module: torch.nn.Module | None,
                        at: str) -> list[tuple[str, str]]:
    """The weight ops behind output leaf ``leaf`` of a submodule's call, in its graph
    (and back out through its arguments, in the caller's)."""
    if module is None:
        return []
    rel = call.args[1]
    child = unwrap(module.get_submodule(rel))
    rg = child.__dict__.get("_umup_region")
    if rg is None:
        return []
    index = sum(1 for v in rg.out_leaves[:leaf] if v is module_mod.TENSOR) if rg.out_leaves else leaf
    output = next(n for n in rg.gm.graph.nodes if n.op == "output")
    leaves = torch.utils._pytree.tree_leaves((call.args[2], call.args[3]))

    def leave(i: int) -> list[tuple[str, str]]:
        return _weight_ops_behind([leaves[i]], module, at)

    return _weight_ops_behind([output.args[0][index]], child, f"{at}{rel}.", leave)


def _qk_projections(gm: fx.GraphModule, module: torch.nn.Module | None = None,
                    ) -> dict[tuple[str, str], str]:
    """{(module path relative to the graph's, weight op node name): its attention node's
    name} for the ops that make q and k: the weight ops behind an attention's q and k
    operands, or behind the logits of a softmax weighing values; their gradients sit
    near ``S^-1/2`` (rules §8). With ``module`` (whose graph ``gm`` is), the ops inside
    the submodules it calls (each linear its own call) are found too."""
    by_name = {n.name: n for n in gm.graph.nodes}
    found: dict[tuple[str, str], str] = {}
    for node in gm.graph.nodes:
        if _is_sdpa(node):
            starts = node.args[:2]
        elif meta.get(node, meta.RULE) == rules.ATTENTION and by_name.get(
                meta.get(node, meta.ATTENTION)["qk"]):
            starts = by_name[meta.get(node, meta.ATTENTION)["qk"]].args[:2]
        elif _weighs_values(node):
            starts = node.args[:1]  # logits assembled otherwise (DeBERTa's relative terms)
        else:
            continue
        found.update((op, node.name) for op in _weight_ops_behind(starts, module))
    return found


def _weighs_values(node: fx.Node) -> bool:
    """A stand-alone softmax (rule "softmax") whose probabilities weigh values: it reaches
    a matmul of activations through dropout and casts. Its logits' weight ops are q / k
    projections for the check's band (rules §8), however the logits are assembled."""
    if not (meta.get(node, meta.RULE) == rules.SOFTMAX or (
            node.op == "call_function" and node.target is umup_ops.softmax)):
        return False
    frontier = list(node.users)
    for _ in range(4):
        if any(u.target is umup_ops.matmul or meta.get(u, meta.RULE) == rules.MATMUL
               for u in frontier):
            return True
        frontier = [v for u in frontier if not meta.get(u, meta.WEIGHT) for v in u.users]
    return False


def _v_projections(gm: fx.GraphModule, module: torch.nn.Module | None = None,
                   ) -> dict[tuple[str, str], str]:
    """{(module path, weight op node name): its SDPA node's name} for the ops that make
    v: the weight ops behind the value operand."""
    return {op: node.name for node in gm.graph.nodes if _is_sdpa(node)
            for op in _weight_ops_behind(node.args[2:3], module)}


def _query_coherence(g: Tensor) -> float:
    """How far the sum over queries (axis -2) of an attention output's gradient is from a
    sum of independent rows: 1 for independent queries, sqrt(queries) when all agree.
    Near-uniform attention hands each value that sum (rules §8)."""
    g = g.detach().float()
    total = float(g.pow(2).sum())
    return (float(g.sum(-2).pow(2).sum()) / total) ** 0.5 if total > 0 else 1.0


def _use_role(plan: Any, weight: str | None, node: str) -> str | None:
    """The role of this use of ``weight`` (a tied weight's uses differ), from the plan."""
    p = plan.params.get(weight) if plan is not None and weight else None
    if p is None:
        return None
    return next((u.role for u in p.uses if u.node == node), p.role) if len(p.uses) > 1 else p.role


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, records: dict[str, OpScale], prefix: str,
                 rename: tuple[str, str], plan: Any = None,
                 module: torch.nn.Module | None = None,
                 lookups: dict[int, tuple[OpScale, Tensor, int, int | None]] | None = None,
                 ) -> None:
        super().__init__(gm)
        self.records = records
        self.prefix = prefix
        self.rename = rename  # (the graph's own block path, this module's path)
        self.plan = plan
        self.qk = {self._key(op): att for op, att in _qk_projections(gm, module).items()}
        self.v = {self._key(op): att for op, att in _v_projections(gm, module).items()}
        # Lookups by output id, shared by every region's recorder of one measure: a table's
        # lookup (its own module's call) may feed a sum of tables in its caller's graph.
        self.lookups = {} if lookups is None else lookups

    def _op_record(self, op: str) -> str | None:
        """The record of flat-graph node ``op``, here or in a submodule this module called
        (a readout linear is its own call; its multiplier is applied by the caller)."""
        if self.prefix + op in self.records:
            return self.prefix + op
        own = self.rename[1]
        inside = [k for k in self.records if k.endswith(":" + op)
                  and (not own or k.startswith(own + "."))]
        return inside[-1] if inside else None

    def _key(self, op: tuple[str, str]) -> str:
        """The record name of a weight op at (path relative to this module, node name)."""
        sub, name = op
        if not sub:
            return self.prefix + name
        own = self.rename[1]
        return f"{own + '.' if own else ''}{sub.rstrip('.')}:{name}"

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        op = meta.get(n, meta.MULTIPLIER)
        key = self._op_record(op) if op is not None else None
        if key is not None:
            # A μP readout times its multiplier: the product is what the layer outputs.
            self.records[key].out_rms = rms(out)
            return out
        if n.name in self.qk.values() and isinstance(out, Tensor):
            # the attention's key length: softmax's last axis, or SDPA's value rows
            args = self.fetch_args_kwargs_from_env(n)[0]
            sdpa = _is_sdpa(n)
            length = args[2].shape[-2] if sdpa else out.shape[-1]
            spread = 1.0 if not sdpa else (
                _spread(args[1]) * _spread(args[2]))
            for key, att in self.qk.items():
                if att == n.name and key in self.records:
                    self.records[key].key_len = int(length)
                    self.records[key].key_spread = spread
        values = [key for key, att in self.v.items() if att == n.name]
        if values and isinstance(out, Tensor) and out.requires_grad:
            out.register_hook(lambda g, values=values: self._on_attention_grad(values, g))
        if n.target is umup_ops.add_tables and isinstance(out, Tensor) and out.requires_grad:
            self._on_table_sum(n, out)
        if not _recorded(n) or not isinstance(out, Tensor):
            return out
        if not out.is_floating_point() or out.numel() < 2:
            return out
        tensors = [a for a in self.fetch_args_kwargs_from_env(n)[0] if isinstance(a, Tensor)]
        weight = meta.get(n, meta.WEIGHT)
        role = _use_role(self.plan, weight, n.name)
        own, live = self.rename
        if weight and own and weight.startswith(own + "."):
            weight = live + weight[len(own):]  # blocks share a graph: name this one's weight
        first = tensors[0] if tensors and n.target not in _EMBEDDING else None
        rec = OpScale(
            node=self.prefix + n.name,
            rule=str(meta.get(n, meta.RULE, "")),
            op=getattr(n.target, "__name__", str(n.target)),
            out_rms=rms(out),
            in_rms=rms(first) if first is not None and first.is_floating_point() else None,
            weight=weight,
            role=role,
            fan_in=int(first.shape[-1]) if first is not None and first.dim() else None,
            source=where(n),
            shape=tuple(out.shape),
        )
        link = meta.get(n, meta.MOE)
        if weight is not None and isinstance(link, dict) and "grad_at_init" in link:
            rec.router_grad = link["grad_at_init"]
        if n.target in _EMBEDDING:  # ATen's embedding is (W, indices)
            rec.weight_rms = rms(tensors[0])
        elif weight is not None and len(tensors) > 1:  # (x, W, ...) and (indices, W)
            rec.weight_rms = rms(tensors[1])
        self.records[rec.node] = rec
        if out.requires_grad:
            x = first if rec.rule == rules.LINEAR and first is not None and first.is_floating_point() else None
            out.register_hook(lambda g, rec=rec, x=x: _on_grad(rec, g, x))
            if rec.rule == rules.EMBEDDING and n.target is umup_ops.embedding:
                args = self.fetch_args_kwargs_from_env(n)[0]
                indices, table = args[0], args[1]
                padding = args[2] if len(args) > 2 else None
                self.lookups[id(out)] = (rec, indices, table.shape[0], padding)
                out.register_hook(lambda g, rec=rec, i=indices, v=table.shape[0], p=padding:
                                  _on_lookup_grad(rec, g, i, v, p))
        return out

    def _on_table_sum(self, n: fx.Node, out: Tensor) -> None:
        """A lookup broadcast into a sum of tables (a position table over the batch):
        its gradient is the scaled sum of its copies', so its factor is measured on the
        sum's per-token gradient with its indices broadcast the same way."""
        for t in self.fetch_args_kwargs_from_env(n)[0]:
            if not isinstance(t, Tensor) or id(t) not in self.lookups or t.numel() >= out.numel():
                continue
            rec, indices, rows, padding = self.lookups[id(t)]
            try:
                spread = torch.broadcast_to(indices, out.shape[:-1])
            except RuntimeError:
                continue
            rec.summed_copies = out.numel() // t.numel()
            out.register_hook(lambda g, rec=rec, i=spread, v=rows, p=padding:
                              _on_lookup_grad(rec, g, i, v, p))

    def _on_attention_grad(self, values: list[str], g: Tensor) -> None:
        for name in values:
            if name in self.records:
                self.records[name].query_coherence = _query_coherence(g)


def _on_grad(rec: OpScale, g: Tensor, x: Tensor | None) -> None:
    rec.grad_rms = rms(g)
    if x is not None and x.shape[:-1] == g.shape[:-1]:
        rec.row_coherence = _row_coherence(g, x)


def _row_coherence(g: Tensor, x: Tensor) -> float:
    """How far a linear's weight gradient ``sum_r g_r x_r^T`` (r: the rows, batch x
    positions) is from a sum of independent terms: its norm over the root of the
    terms' squared norms. 1 for independent rows; up to sqrt(rows) when every row
    brings the same term (rules §8: the weight gradient's ``rows^-1/2`` assumes 1)."""
    g2, x2 = g.detach().float().reshape(-1, g.shape[-1]), x.detach().float().reshape(-1, x.shape[-1])
    terms = float((g2.pow(2).sum(-1) * x2.pow(2).sum(-1)).sum())
    return float(torch.linalg.matrix_norm(g2.T @ x2)) / terms**0.5 if terms > 0 else 1.0


def lookup_factor(g: Tensor, indices: Tensor, rows: int, padding_idx: int | None = None) -> float:
    """What u-muP predicts an embedding's weight gradient RMS to be, over its output
    gradient's (rules §8). ``ops.embedding`` scales the table's gradient by
    ``(V / N)^1/2`` (V rows, N indices): unit when each row's sum of the ``c_v``
    output gradients of the tokens that hit it grows like ``c_v^1/2`` (independent
    gradients). A part ``rho`` of the gradients' power that every position shares (at
    init, the logits' softmax is near uniform, so ``W_out^T p`` is the same at every
    position) adds up like ``c_v`` instead, so the sum over rows is
    ``(1 - rho) N + rho sum_v c_v^2`` and the RMS ``sqrt(1 - rho + rho sum_v c_v^2 / N)``
    times the output gradient's: ``sum_v c_v^2 / N`` is ``1 + (N - 1) / V`` for uniform
    ids, and much more for text, whose few common tokens hit their rows hundreds of
    times. ``g``: the output gradient, ``[..., d]``; padding tokens get no gradient."""
    g2 = g.detach().float().reshape(-1, g.shape[-1])
    ids = indices.detach().reshape(-1)
    if padding_idx is not None:
        kept = ids != padding_idx % rows
        g2, ids = g2[kept], ids[kept]
    total = float(g2.pow(2).sum(-1).mean()) if len(ids) else 0.0
    if total <= 0:
        return 1.0
    rho = float(g2.mean(0).pow(2).sum()) / total
    counts = torch.bincount(ids, minlength=rows).double()
    return math.sqrt(1 - rho + rho * float(counts.pow(2).sum()) / len(ids))


def _on_lookup_grad(rec: OpScale, g: Tensor, indices: Tensor, rows: int,
                    padding_idx: int | None) -> None:
    # A broadcast lookup's factor comes first, from the sum's gradient (its own output's
    # gradient, summed over the copies, has each row once): keep the larger.
    rec.lookup_factor = max(rec.lookup_factor, lookup_factor(g, indices, rows, padding_idx))


def _output_grad(y: Tensor, records: Any) -> Tensor:
    """The gradient a training loss sends to the model's output ``y``: a scalar loss's
    1; for logits a readout returns, a mean cross-entropy's against random targets (the
    rewrite scales a returned readout's backward for a loss outside the model, rules §3);
    for any other tensor a unit-Gaussian one, as a unit-scaled loss would send."""
    if y.numel() == 1:
        return torch.ones_like(y)
    gen = torch.Generator(device=y.device).manual_seed(0)
    if any(r.role == "output" and r.shape == tuple(y.shape) for r in records) and y.dim() > 1:
        logits = y.detach().flatten(0, -2).float().requires_grad_()
        targets = torch.randint(0, y.shape[-1], logits.shape[:1], generator=gen, device=y.device)
        (grad,) = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, targets), logits)
        return grad.reshape(y.shape).to(y.dtype)
    return torch.randn(y.shape, generator=gen, device=y.device, dtype=y.dtype)


@dataclass
class Measured:
    """One forward + backward of a transformed model: per-op records and the output."""

    records: list[OpScale]
    output: Any  # what the model returned
    backward_from: Tensor | None  # the tensor the backward started from


def measure(
    model: UmupModule, *args: Any, backward: bool = True, **kwargs: Any
) -> Measured:
    """One forward (and backward) of ``model(*args, **kwargs)``; RMS per rewritten op,
    and per weight op the RMS of its parameter's gradient.

    The backward starts from the model's output with what a loss sends it
    (``_output_grad``: a scalar loss as is, logits a mean cross-entropy's gradient, any
    other output a unit-RMS random one; seeded). Parameters' ``.grad`` are not touched.
    """
    if not isinstance(model, UmupModule):
        raise TypeError("op_scales takes the module umup_fx.transform rewrote.")
    paths = {id(m): canonical_name(n) for n, m in model.named_modules()}
    plan = getattr(model, "umup_plan", None)
    records: dict[str, OpScale] = {}
    lookups: dict[int, tuple[OpScale, Tensor, int, int | None]] = {}

    def record(module: torch.nn.Module, rg: Any, values: list[Any]) -> Any:
        path = paths.get(id(module), "")
        prefix = f"{path}:" if path else ""
        recorder = _Recorder(rg.gm, records, prefix, (rg.name if path else "", path), plan,
                             module, lookups)
        return recorder.run(*values)

    named = {canonical_name(n): p for n, p in model.named_parameters() if p.requires_grad}
    saved, module_mod.graph_runner = module_mod.graph_runner, record
    try:
        with torch.enable_grad():
            out = model(*args, **kwargs)
    finally:
        module_mod.graph_runner = saved
    y = None
    with torch.enable_grad():
        if backward:
            y = out if isinstance(out, Tensor) else next(
                t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, Tensor)
            )
            grad = _output_grad(y, records.values())
            # Gradients w.r.t. the parameters run the whole backward (firing the
            # hooks) without touching their .grad.
            if named and y.requires_grad:
                grads = torch.autograd.grad(y, list(named.values()), grad, allow_unused=True)
                by_name = {n: g for n, g in zip(named, grads, strict=True) if g is not None}
                for rec in records.values():
                    if rec.weight in by_name:
                        rec.weight_grad_rms = rms(by_name[rec.weight])
    return Measured(list(records.values()), out, y)


def op_scales(
    model: UmupModule, *args: Any, backward: bool = True, **kwargs: Any
) -> list[OpScale]:
    """The per-op records of ``measure`` (one forward and backward)."""
    return measure(model, *args, backward=backward, **kwargs).records


def out_of_range(records: list[OpScale], low: float = 0.5, high: float = 2.0) -> list[str]:
    """Readable lines for records whose output or gradient RMS is outside [low, high]."""
    bad = []
    for r in records:
        for what, v in (("output", r.out_rms), ("grad", r.grad_rms)):
            if v is not None and (math.isnan(v) or not low <= v <= high):
                bad.append(f"{r.node} ({r.rule}) {what} RMS {v:.3g}")
    return bad
