"""Scale tracking: the RMS of every rewritten op's output, its gradient and its inputs.

Unit scaling's claim is checkable: at init every op the rewrite scaled should see
RMS ~1 values and gradients (rules §8), and FP8 is safe while the tensors an FP8
matmul casts stay far inside the format's range. ``op_scales`` measures one
forward + backward of a transformed model without changing it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx

from umup_fx import meta
from umup_fx.passes._graph import MATMULS, is_grouped_mm, ops
from umup_fx.runtime import fp8 as fp8_ops
from umup_fx.runtime import modules as module_mod
from umup_fx.runtime import ops as umup_ops
from umup_fx.runtime.modules import UmupModule
from umup_fx.runtime.names import canonical_name

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


def rms(x: Tensor) -> float:
    return float(x.detach().float().pow(2).mean().sqrt())


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, records: dict[str, OpScale], prefix: str,
                 rename: tuple[str, str]) -> None:
        super().__init__(gm)
        self.records = records
        self.prefix = prefix
        self.rename = rename  # (the graph's own block path, this module's path)

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        op = meta.get(n, meta.MULTIPLIER)
        if op is not None and self.prefix + op in self.records:
            # A μP readout times its multiplier: the product is what the layer outputs.
            self.records[self.prefix + op].out_rms = rms(out)
            return out
        if not _recorded(n) or not isinstance(out, Tensor):
            return out
        if not out.is_floating_point() or out.numel() < 2:
            return out
        tensors = [a for a in self.fetch_args_kwargs_from_env(n)[0] if isinstance(a, Tensor)]
        weight = meta.get(n, meta.WEIGHT)
        own, live = self.rename
        if weight and own and weight.startswith(own + "."):
            weight = live + weight[len(own):]  # blocks share a graph: name this one's weight
        rec = OpScale(
            node=self.prefix + n.name,
            rule=str(meta.get(n, meta.RULE, "")),
            op=getattr(n.target, "__name__", str(n.target)),
            out_rms=rms(out),
            in_rms=rms(tensors[0]) if tensors and tensors[0].is_floating_point()
            and n.target not in _EMBEDDING else None,
            weight=weight,
        )
        if n.target in _EMBEDDING:  # ATen's embedding is (W, indices)
            rec.weight_rms = rms(tensors[0])
        elif weight is not None and len(tensors) > 1:  # (x, W, ...) and (indices, W)
            rec.weight_rms = rms(tensors[1])
        self.records[rec.node] = rec
        if out.requires_grad:
            out.register_hook(lambda g, rec=rec: setattr(rec, "grad_rms", rms(g)))
        return out


def op_scales(
    model: UmupModule, *args: Any, backward: bool = True, **kwargs: Any
) -> list[OpScale]:
    """One forward (and backward) of ``model(*args, **kwargs)``; RMS per rewritten op.

    The backward starts from the model's output: a scalar loss as is, any other output
    with a unit-RMS random gradient (seeded), as unit scaling assumes. Parameters'
    ``.grad`` are not touched.
    """
    if not isinstance(model, UmupModule):
        raise TypeError("op_scales takes the module umup_fx.transform rewrote.")
    paths = {id(m): canonical_name(n) for n, m in model.named_modules()}
    records: dict[str, OpScale] = {}

    def record(module: torch.nn.Module, rg: Any, values: list[Any]) -> Any:
        path = paths.get(id(module), "")
        prefix = f"{path}:" if path else ""
        return _Recorder(rg.gm, records, prefix, (rg.name if path else "", path)).run(*values)

    params = [p for p in model.parameters() if p.requires_grad]
    saved, module_mod.graph_runner = module_mod.graph_runner, record
    try:
        with torch.enable_grad():
            out = model(*args, **kwargs)
    finally:
        module_mod.graph_runner = saved
    with torch.enable_grad():
        if backward:
            y = out if isinstance(out, Tensor) else next(
                t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, Tensor)
            )
            if y.numel() == 1:
                grad = torch.ones_like(y)
            else:
                gen = torch.Generator(device=y.device).manual_seed(0)
                grad = torch.randn(y.shape, generator=gen, device=y.device, dtype=y.dtype)
            # Gradients w.r.t. the parameters run the whole backward (firing the
            # hooks) without touching their .grad.
            if params:
                torch.autograd.grad(y, params, grad, allow_unused=True)
    return list(records.values())


def out_of_range(records: list[OpScale], low: float = 0.5, high: float = 2.0) -> list[str]:
    """Readable lines for records whose output or gradient RMS is outside [low, high]."""
    bad = []
    for r in records:
        for what, v in (("output", r.out_rms), ("grad", r.grad_rms)):
            if v is not None and (math.isnan(v) or not low <= v <= high):
                bad.append(f"{r.node} ({r.rule}) {what} RMS {v:.3g}")
    return bad
