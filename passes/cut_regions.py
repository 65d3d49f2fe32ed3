"""Cut the rewritten flat graph at every module call: the root's graph, and one graph
per submodule call (blocks among them) that the module runs as its ``forward``.

The capture preserved the call signature of every module it could call
(``program.module_call_graph``: the graph nodes of its flattened inputs and outputs,
its argument structure). Every node is assigned to the deepest module call whose path
its ``nn_module_stack`` names (nodes the rewrite inserted go with their users), then:

* each call's nodes become a graph whose placeholders are the call's arguments, the
  module's own parameters and buffers (read from the module at call time, so FSDP2's
  unsharded parameters and a checkpoint wrapper's recompute are what it sees), the
  training flag, and for a block its residual taus;
* a graph calls each direct child through ``call_block`` with the original arguments,
  so the child's ``__call__`` (hooks, FSDP2's unshard, tensor parallel's
  redistribution, wrappers) runs;
* a kept prefix of blocks stands for the whole list: the calls are unrolled to every
  block (``unroll_calls``) when they form a chain (each block's output feeds the next
  one, all other arguments shared);
* a module that reads the branch side of a residual split of its argument (a pre-norm,
  or a block that is a whole residual branch of its parent) gets that side as its
  argument: the split and the add stay in the caller (``_branch_entries``);
* a submodule whose call cannot be cut (the rewrite fused its op with its caller's, its
  caller reads a value inside it, it holds its block's residual add, it is called twice)
  runs inside its caller's graph, listed in ``Split.inlined`` with why.

Reads: ``program.module_call_graph``; ``nn_module_stack``; ``umup.kind`` / ``umup.param``
/ ``umup.norm_scale`` on placeholders; ``umup.residual`` on residual ops; ``umup.training`` (graph).
Writes: new ``fx.GraphModule`` objects (the flat graph is not modified).
Fails when: a block's (or the root's) nodes read a value its call does not pass, or two
blocks of one structure key rewrite differently: ``RegionError``; ``transform`` then
captures all blocks (``capture(..., full=True)``) or runs the model as one graph, and
says so.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
import torch.utils.checkpoint
from torch import fx
from torch.export import ExportedProgram
from torch.export.graph_signature import (
    ConstantArgument,
    InputKind,
    OutputKind,
)

from umup_fx import meta
from umup_fx.errors import UmupError
from umup_fx.runtime import ops
from umup_fx.runtime.modules import TENSOR, RegionGraph
from umup_fx.runtime.names import canonical_name


class RegionError(UmupError):
    """The graph could not be cut at the block boundaries."""


def call_block(root: torch.nn.Module, path: str, args: tuple, kwargs: dict,
               checkpoint: dict[str, Any] | None = None) -> list[Any]:
    """Call the submodule at ``path`` of ``root`` (the calling module) as the model
    would: its ``__call__`` runs hooks (FSDP2's unshard, tensor parallel's
    redistribution, the user's) and checkpoint and compile wrappers, under
    ``torch.utils.checkpoint`` with ``checkpoint``'s options where the model's forward
    checkpointed it; its output, flattened."""
    block = root.get_submodule(path)
    if checkpoint is None:
        return pytree.tree_leaves(block(*args, **kwargs))
    return pytree.tree_leaves(torch.utils.checkpoint.checkpoint(block, *args, **checkpoint, **kwargs))



def _innermost_module(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, _ = list(stack.values())[-1]
    return canonical_name(path.split("@")[0])


def _deepest(path: str, regions: list[str]) -> str:
    """The deepest region (module path) holding ``path``; "" (the root) if none."""
    for r in regions:  # deepest first
        if path == r or path.startswith(r + "."):
            return r
    return ""


def _common(paths: set[str], regions: list[str]) -> str:
    """The deepest region holding every one of ``paths``."""
    for r in regions:
        if all(p == r or p.startswith(r + ".") for p in paths):
            return r
    return ""


def assign_regions(gm: fx.GraphModule, paths: list[str]) -> dict[fx.Node, str]:
    """The deepest region among ``paths`` (or "" for the root) of every call_function
    node; a node the rewrite inserted goes with its users (their common region)."""
    regions = sorted(paths, key=lambda p: p.count(".") + 1, reverse=True)
    region: dict[fx.Node, str] = {}
    pending = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        inner = _innermost_module(node)
        if inner is None:
            pending.append(node)
        else:
            region[node] = _deepest(inner, regions)
    for node in reversed(pending):  # inserted nodes go with their users
        users = {region.get(u, "") for u in node.users if u.op != "output"}
        if any(u.op == "output" for u in node.users):
            users.add("")
        region[node] = _common(users, regions) if users else ""
    return region


def _branch_entries(gm: fx.GraphModule, sig: Any, by_name: dict[str, fx.Node],
                    region: dict[fx.Node, str], block: str, parent: str) -> dict[int, fx.Node]:
    """{input leaf: branch input} for a module that reads the branch side of a residual
    split of its argument (a pre-norm's norm; a block that is a whole residual branch of
    its parent, ``x = x + block(x)`` in the parent's loop): its caller computes the split
    and passes the branch side instead (rules §4: the split belongs to the skip, next to
    the add, in the caller)."""
    first = {}
    for i, a in enumerate(sig.inputs):
        if not isinstance(a, ConstantArgument) and a.name in by_name:
            first.setdefault(by_name[a.name], i)
    entries = {}
    for node in gm.graph.nodes:
        if not (node.target is operator.getitem and node.args[1] in (0, 1)
                and isinstance(node.args[0], fx.Node)
                and node.args[0].target is ops.residual_split
                and region.get(node.args[0]) != block  # the split sits in the caller
                and _split_source(node) in first):
            continue
        if region.get(node) != block and not any(region.get(u) == block for u in node.users):
            continue  # a side another module reads (parallel branches share one)
        i = first[_split_source(node)]
        if entries.get(i, node) is not node:
            continue  # both sides of one argument: the module must split it itself
        if region.get(node) == block:
            region[node] = parent
        entries[i] = node
    return entries


def _split_source(node: fx.Node) -> fx.Node:
    """The value a chain of residual splits splits (parallel branches split the skip
    side of the first split again: GPT-NeoX's attention and MLP both read x)."""
    while (node.target is operator.getitem and isinstance(node.args[0], fx.Node)
           and node.args[0].target is ops.residual_split):
        node = node.args[0].args[0]
    return node


def _leaf_nodes(signature_args: list[Any], by_name: dict[str, fx.Node]) -> list[Any]:
    out = []
    for a in signature_args:
        if isinstance(a, ConstantArgument):
            out.append(a.value)
        elif a.name in by_name:
            out.append(by_name[a.name])
        else:
            raise RegionError(f"block boundary value {a.name} was rewritten away")
    return out


def _placeholder_targets(program: ExportedProgram, gm: fx.GraphModule) -> dict[str, tuple[str, Any]]:
    """{placeholder name: (kind, target)} from the graph signature and our markers."""
    kinds = {
        InputKind.PARAMETER: "param",
        InputKind.BUFFER: "buffer",
        InputKind.CONSTANT_TENSOR: "constant",
        InputKind.USER_INPUT: "input",
    }
    out: dict[str, tuple[str, Any]] = {}
    user = 0
    for spec in program.graph_signature.input_specs:
        if spec.kind not in kinds:
            raise UmupError(f"umup_fx cannot feed graph input {spec.arg.name} of kind {spec.kind}.")
        kind = kinds[spec.kind]
        if kind == "input":
            out[spec.arg.name] = ("input", user)
            user += 1
        elif kind == "param":
            out[spec.arg.name] = ("param", spec.target)
        else:
            out[spec.arg.name] = (kind, spec.target)
    training = meta.graph_meta(gm).get(meta.TRAINING)
    if training is not None:
        out[training] = ("training", None)
    for node in gm.graph.nodes:  # pretrained import's norm factors (passes/scale_norms.py)
        if node.op == "placeholder" and meta.get(node, meta.NORM_SCALE):
            out[node.name] = ("buffer", meta.get(node, meta.NORM_SCALE))
    return out


def _relative(target: str, block: str) -> str | None:
    return target[len(block) + 1 :] if target.startswith(block + ".") else None


class _Builder:
    """A new graph filled by copying nodes of the flat graph."""

    def __init__(self) -> None:
        self.graph = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}
        self.inputs: list[tuple[str, Any]] = []

    def placeholder(self, name: str, source: tuple[str, Any], like: fx.Node | None = None) -> fx.Node:
        # After the placeholders made so far (their order is ``inputs``'), before any op.
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        with (self.graph.inserting_after(placeholders[-1]) if placeholders
              else self.graph.inserting_before(None)):
            node = self.graph.placeholder(name)
        if like is not None:
            node.meta.update({k: v for k, v in like.meta.items() if k != "umup"})
            node.meta["umup"] = dict(like.meta.get("umup", {}))
            self.env[like] = node
        self.inputs.append(source)
        return node

    def copy(self, node: fx.Node) -> fx.Node:
        new = self.graph.node_copy(node, lambda n: self.env[n])
        self.env[node] = new
        return new


_SYM_SIZE = torch.ops.aten.sym_size.int
_ASSERT_METADATA = getattr(getattr(torch.ops.aten, "_assert_tensor_metadata", None), "default", None)


def _size_in_block(b: _Builder, size: fx.Node, block: str) -> fx.Node:
    """Recompute a symbolic size the root computed from the block's own inputs: the
    same sympy expression as an input's dimension, or the same arithmetic on such."""
    if size in b.env:
        return b.env[size]
    expr = size.meta["val"].node.expr
    for ph in [n for n in b.graph.nodes if n.op == "placeholder"]:
        val = ph.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        for d, dim in enumerate(val.shape):
            if isinstance(dim, torch.SymInt) and dim.node.expr == expr:
                new = b.graph.call_function(_SYM_SIZE, (ph, d))
                new.meta["val"] = size.meta["val"]
                b.env[size] = new
                return new
    if size.op == "call_function" and size.target is not _SYM_SIZE:
        for a in size.all_input_nodes:
            _size_in_block(b, a, block)
        return b.copy(size)
    raise RegionError(f"block {block} needs size {expr}, which none of its inputs has")


def _residual_ops(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes
            if n.op == "call_function" and n.target in (ops.residual_split, ops.residual_add)]


def _taus_as_input(b: _Builder, order: list[int]) -> None:
    """Residual ops read tau from ``_umup_taus`` (one graph, many depths): the block's
    taus, in ``order`` (the block's residual indices, sorted), which the block and any
    submodule of it holding some of its residual ops (BERT's attention output, T5's
    layers) each carry."""
    residual = _residual_ops(b.graph)
    if not residual:
        return
    first = next(n for n in b.graph.nodes if n.op != "placeholder")
    with b.graph.inserting_before(first):
        taus = b.graph.placeholder("umup_taus")
    b.inputs.append(("taus", None))
    for n in residual:
        j = order.index(meta.get(n, meta.RESIDUAL).index)
        with b.graph.inserting_before(n):
            tau = b.graph.call_function(operator.getitem, (taus, j))
        n.args = (*n.args[:-1], tau)  # tau is the last argument of both ops


@dataclass
class Split:
    root: RegionGraph
    regions: dict[str, RegionGraph]  # every module call kept (blocks included) -> its graph
    calls: list[tuple[str, fx.Node]]  # (module path, call node in its caller's graph), in order
    inlined: dict[str, str]  # module called whose ops stay in its caller's graph -> why


class _Inline(Exception):  # noqa: N818 - control flow inside split_regions, never raised out
    """A submodule's call cannot be cut out: its ops go back into its caller's graph."""

    def __init__(self, path: str, why: str) -> None:
        super().__init__(why)
        self.path, self.why = path, why


class _Cut:
    """One attempt at cutting ``gm`` at ``regions`` (module paths, blocks among them)."""

    def __init__(self, gm: fx.GraphModule, program: ExportedProgram, regions: list[str],
                 blocks: list[str], calls: dict[str, Any]) -> None:
        self.gm, self.program, self.blocks, self.calls = gm, program, set(blocks), calls
        self.by_name = {n.name: n for n in gm.graph.nodes}
        for old, new in meta.graph_meta(gm).get(meta.REPLACED, {}).items():
            self.by_name.setdefault(old, self.by_name[new])
        self.targets = _placeholder_targets(program, gm)
        # A tied weight's other names: the embedding reads as its own what export names
        # lm_head.weight.
        self.aliases: dict[str, tuple[str, ...]] = {}
        for info in meta.graph_meta(gm).get(meta.PARAMS, {}).values():
            names = (info.name, *info.aliases)
            for n in names:
                self.aliases[n] = tuple(x for x in names if x != n)
        self.constants = dict(program.constants)
        deepest_first = sorted(regions, key=lambda p: p.count(".") + 1, reverse=True)
        self.parent = {r: _common({r.rpartition(".")[0]}, deepest_first) if "." in r else ""
                       for r in regions}
        self.region = assign_regions(gm, regions)
        # Deepest first: a norm called on a residual split's branch side takes that side
        # as its argument, computed in its caller (the split belongs next to its add).
        self.entries = {p: _branch_entries(gm, calls[p].signature, self.by_name, self.region,
                                           p, self.parent[p]) for p in deepest_first}
        self.residual_order: dict[str, list[int]] = {}  # block -> its residual indices
        for n in _residual_ops(gm.graph):
            block = self.block_of(self.region.get(n, ""))
            if block is not None:
                self.residual_order.setdefault(block, []).append(meta.get(n, meta.RESIDUAL).index)
        self.residual_order = {k: sorted(set(v)) for k, v in self.residual_order.items()}
        self.last: dict[str, fx.Node] = {}  # region -> the last node of its subtree
        for node in gm.graph.nodes:
            r = self.region.get(node)
            while r:
                self.last[r] = node
                r = self.parent[r]

    def fail(self, path: str, why: str) -> Exception:
        if path and path not in self.blocks:
            return _Inline(path, why)
        return RegionError(f"{f'block {path}' if path else 'the root'} {why}")

    def child_of(self, r: str, owner: str) -> str | None:
        """The direct child region of ``r`` whose subtree holds region ``owner``."""
        while owner and self.parent[owner] != r:
            owner = self.parent[owner]
        return owner or None

    def block_of(self, r: str) -> str | None:
        """The block region ``r`` is, or lies in; None outside blocks."""
        while r and r not in self.blocks:
            r = self.parent[r]
        return r or None

    def value(self, b: _Builder, node: fx.Node, r: str) -> fx.Node:
        """``node``'s value in region ``r``'s graph: computed there, passed in, or read."""
        if node in b.env:
            return b.env[node]
        if node.op == "placeholder":
            kind, target = self.targets[node.name]
            if kind in ("param", "buffer"):
                names = [canonical_name(target), *self.aliases.get(canonical_name(target), ())]
                rel = next((x for x in (_relative(n, r) if r else n for n in names) if x), None)
                if rel is None:
                    raise self.fail(r, f"uses {target}, which it does not own")
                return b.placeholder(node.name, (kind, rel), like=node)
            if kind in ("constant", "training"):
                return b.placeholder(node.name, (kind, target if kind == "constant" else None),
                                     like=node)
            raise self.fail(r, f"reads model input {node.name} directly")
        if isinstance(node.meta.get("val"), torch.SymInt):
            try:
                return _size_in_block(b, node, r)  # a size its caller computed: recomputed
            except RegionError as exc:
                raise self.fail(r, str(exc)) from None
        owner = self.region.get(node, "")
        child = self.child_of(r, owner) if owner != r else None
        if child is not None:
            raise self.fail(child, f"computes {node.name}, which its caller reads but its call "
                                   "does not return")
        raise self.fail(r, f"reads {node.name} ({node.op}), which its call does not pass")

    def copy(self, b: _Builder, node: fx.Node, r: str) -> fx.Node:
        for inp in node.all_input_nodes:
            self.value(b, inp, r)
        return b.copy(node)

    def graph(self, r: str, example_leaves: list[Any], name: str,
              checkpointed: dict[str, dict[str, Any]]) -> tuple[RegionGraph, list]:
        """Region ``r``'s graph: its own nodes, and one call per direct child region at
        the place of that child's last node."""
        b = _Builder()
        if r == "":
            for node in self.gm.graph.nodes:
                if node.op == "placeholder":
                    b.placeholder(node.name, self.targets[node.name], like=node)
            leaves = example_leaves
        else:
            sig = self.calls[r].signature
            leaves = []
            for i, a in enumerate(sig.inputs):
                if isinstance(a, ConstantArgument):
                    leaves.append(a.value)
                    continue
                leaves.append(TENSOR)
                src = self.entries.get(r, {}).get(i, self.by_name.get(a.name))
                if src is None:
                    raise self.fail(r, f"takes {a.name}, which the rewrite removed")
                like = None if src in b.env else src  # the same value twice: one binding
                ph = b.placeholder(f"arg{i}", ("input", i), like=like)
                if i in self.entries.get(r, {}):  # the split's value, read for its dtype
                    b.env.setdefault(_split_source(src), ph)  # (Gemma's type_as(y, x))
        self_ph = b.graph.placeholder("umup_self")
        b.inputs.append(("module", None))
        calls: list[tuple[str, fx.Node]] = []
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                if r == "":
                    for inp in node.all_input_nodes:
                        self.value(b, inp, r)
                    b.graph.output(fx.node.map_arg(node.args[0], lambda n: b.env[n]))
                continue
            owner = self.region.get(node, "")
            if node.target is _ASSERT_METADATA:
                continue  # export's check of the capture's stand-ins (passes/placement.py)
            if owner == r:
                self.copy(b, node, r)
                continue
            child = self.child_of(r, owner)
            if child is not None and node is self.last[child]:
                calls.append((child, self._emit_call(b, self_ph, r, child, checkpointed.get(child))))
        if r == "":
            outputs = _root_outputs(self.program)
            in_spec, out_spec, out_leaves = (self.program.call_spec.in_spec,
                                             self.program.call_spec.out_spec, [])
        else:
            sig = self.calls[r].signature
            outs = []
            for a in sig.outputs:
                if isinstance(a, ConstantArgument):
                    outs.append(a.value)
                elif a.name not in self.by_name:
                    raise self.fail(r, f"returns {a.name}, which the rewrite removed")
                else:
                    outs.append(self.by_name[a.name])
            out_leaves = [v if not isinstance(v, fx.Node) else TENSOR for v in outs]
            try:
                b.graph.output(tuple(b.env[n] for n in outs if isinstance(n, fx.Node)))
            except KeyError:
                raise self.fail(r, "returns a value it does not compute") from None
            outputs = [("user", None)] * sum(isinstance(n, fx.Node) for n in outs)
            in_spec, out_spec = sig.in_spec, sig.out_spec
            block = self.block_of(r)
            if block is not None:
                _taus_as_input(b, self.residual_order.get(block, []))
        _drop_unused_placeholders(b)
        used = {t for k, t in b.inputs if k == "constant"}
        gm = fx.GraphModule(self.gm, b.graph,
                            class_name=f"umup_{r.replace('.', '_')}" if r else "umup_root")
        return RegionGraph(gm, b.inputs, outputs, in_spec, leaves, out_spec, out_leaves,
                           {k: v for k, v in self.constants.items() if k in used},
                           r or name), calls

    def _emit_call(self, b: _Builder, self_ph: fx.Node, r: str, child: str,
                   checkpoint: dict[str, Any] | None) -> fx.Node:
        sig = self.calls[child].signature
        entries = self.entries.get(child, {})
        leaves = []
        try:
            signature_inputs = _leaf_nodes(sig.inputs, self.by_name)
            signature_outputs = _leaf_nodes(sig.outputs, self.by_name)
        except RegionError as exc:
            raise self.fail(child, str(exc)) from None
        for i, v in enumerate(signature_inputs):
            if i in entries:
                v = entries[i]
            leaves.append(self.value(b, v, r) if isinstance(v, fx.Node) else v)
        args, kwargs = pytree.tree_unflatten(leaves, sig.in_spec)
        rel = _relative(child, r) if r else child
        call = b.graph.call_function(call_block, (self_ph, rel, tuple(args), dict(kwargs),
                                                  checkpoint))
        call.meta["umup_call"] = {"path": child, "caller": r, "in_spec": sig.in_spec,
                                  "leaves": leaves}
        for i, out in enumerate(signature_outputs):
            if isinstance(out, fx.Node):
                item = b.graph.call_function(operator.getitem, (call, i))
                item.meta["val"] = out.meta.get("val")
                b.env[out] = item
        return call


def _drop_unused_placeholders(b: _Builder) -> None:
    """A graph does not read its children's weights (each child reads its own, at its
    call: under FSDP2 only then are they unsharded); dead size reads go too."""
    for node in reversed(list(b.graph.nodes)):
        if node.op == "call_function" and node.target is _SYM_SIZE and not node.users:
            b.graph.erase_node(node)
    placeholders = [n for n in b.graph.nodes if n.op == "placeholder"]
    keep = []
    for node, source in zip(placeholders, b.inputs, strict=True):
        if node.users or source[0] in ("input", "module", "training"):
            keep.append(source)
        else:
            b.graph.erase_node(node)
    b.inputs[:] = keep


def _root_outputs(program: ExportedProgram) -> list[tuple[str, Any]]:
    outputs = []
    for spec in program.graph_signature.output_specs:
        if spec.kind == OutputKind.USER_OUTPUT:
            outputs.append(("user", None))
        elif spec.kind == OutputKind.BUFFER_MUTATION:
            outputs.append(("buffer", spec.target))
        else:
            raise UmupError(
                f"umup_fx cannot handle graph output {spec.arg} of kind {spec.kind} "
                "(for example an in-place update of a model input)."
            )
    return outputs


def split_regions(
    gm: fx.GraphModule,
    program: ExportedProgram,
    block_paths: list[str],
    module_paths: list[str],
    example_leaves: list[Any],
    name: str,
    checkpointed: dict[str, dict[str, Any]] | None = None,
) -> Split:
    """Cut ``gm`` (rewritten) into one graph per module call the capture kept (every
    kept block, and every module in ``module_paths`` called once) and the root's; each
    graph calls its direct children through ``call_block``, under
    ``torch.utils.checkpoint`` for those in ``checkpointed``. A module whose call cannot
    be cut (the rewrite fused its ops with its caller's, its caller reads a value inside
    it, it holds a residual add of its block) stays inside its caller's graph: listed in
    ``Split.inlined`` with why."""
    calls: dict[str, Any] = {}
    inlined: dict[str, str] = {}
    for e in program.module_call_graph:
        path, _, again = e.fqn.partition("@")
        if again:
            inlined[canonical_name(path)] = "called more than once in one forward"
        elif e.fqn and e.signature is not None:
            calls[canonical_name(e.fqn)] = e
    if any(p not in calls for p in block_paths):
        raise RegionError("the export did not record every block call")
    for p in block_paths:
        inlined.pop(p, None)
    regions = [p for p in dict.fromkeys([*block_paths, *module_paths])
               if p in calls and p not in inlined]
    while True:
        try:
            cut = _Cut(gm, program, regions, block_paths, calls)
            built = {r: cut.graph(r, example_leaves, name, checkpointed or {})
                     for r in ["", *regions]}
        except _Inline as exc:
            regions.remove(exc.path)
            inlined[exc.path] = exc.why
            continue
        break
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    made = sorted((c for _, cs in built.values() for c in cs), key=lambda c: order[cut.last[c[0]]])
    root, _ = built.pop("")
    return Split(root, {r: g for r, (g, _) in built.items()}, made, inlined)


def _chain(prev: fx.Node, cur: fx.Node) -> dict[int, int] | None:
    """{input leaf: output leaf of ``prev``} where ``cur`` reads ``prev``'s outputs, when
    every other input leaf is the same value for both calls; else None."""
    a, c = prev.meta["umup_call"]["leaves"], cur.meta["umup_call"]["leaves"]
    if len(a) != len(c) or prev.args[4] != cur.args[4]:  # checkpointed alike, too
        return None
    links = {}
    for i, (x, y) in enumerate(zip(a, c, strict=True)):
        if isinstance(y, fx.Node) and y.target is operator.getitem and y.args[0] is prev:
            links[i] = y.args[1]
        elif x is not y and x != y:
            return None
    return links or None


def unroll_calls(split: Split, path_of: list[str]) -> None:
    """Extend the root's chain of kept block calls to every block in ``path_of``.

    The kept calls must form a chain: call i reads call i-1's outputs at the same
    places, shares every other argument, and nothing else reads call i-1's outputs.
    The added calls repeat that pattern; the root's readers of the last kept call's
    outputs read the last added call's instead.
    """
    calls = [n for p, n in split.calls if p in path_of]
    if len(calls) == len(path_of):
        return
    if len(calls) < 2:
        raise RegionError("fewer than two kept block calls: cannot tell the chain")
    links = _chain(calls[0], calls[1])
    if links is None:
        raise RegionError("block calls do not form a chain")
    for prev, cur in zip(calls[:-1], calls[1:], strict=True):
        if _chain(prev, cur) != links:
            raise RegionError("block calls do not form one chain pattern")
        outside = [v for u in prev.users for v in u.users if v is not cur]
        if outside:
            raise RegionError("the root reads a block's output other than the next block")
    graph = calls[-1].graph
    last = calls[-1]
    last_items = {u.args[1]: u for u in last.users}
    readers = {i: list(item.users) for i, item in last_items.items()}
    template = last.meta["umup_call"]
    anchor = max(last_items.values(), key=lambda n: list(graph.nodes).index(n), default=last)
    prev = last
    for path in path_of[len(calls):]:
        leaves = list(template["leaves"])
        with graph.inserting_after(anchor):
            items = {}
            for i, o in links.items():
                items[o] = items.get(o) or graph.call_function(operator.getitem, (prev, o))
                leaves[i] = items[o]
        args, kwargs = pytree.tree_unflatten(leaves, template["in_spec"])
        with graph.inserting_after(max(items.values(), key=lambda n: list(graph.nodes).index(n))):
            caller = template["caller"]
            call = graph.call_function(
                call_block, (last.args[0], _relative(path, caller) if caller else path,
                             tuple(args), dict(kwargs), last.args[4])
            )
        call.meta["umup_call"] = {**template, "path": path, "leaves": leaves}
        anchor, prev = call, call
        split.calls.append((path, call))
    with graph.inserting_after(anchor):
        for i, users in readers.items():
            new = graph.call_function(operator.getitem, (prev, i))
            new.meta["val"] = last_items[i].meta.get("val")
            for user in users:
                user.replace_input_with(last_items[i], new)
    graph.lint()
