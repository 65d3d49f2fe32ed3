"""Cut the rewritten flat graph into the root's graph and one graph per block.

The capture preserved each kept block's call signature (``program.module_call_graph``:
the graph nodes of its flattened inputs and outputs, its argument structure). Every
node is assigned to the block whose module path its ``nn_module_stack`` names (nodes
the rewrite inserted follow their users), then:

* each kept block's nodes become a graph of their own whose placeholders are the
  block's call arguments, its own parameters and buffers (read from the block module
  at call time, so FSDP2's unsharded parameters and a checkpoint wrapper's recompute
  are what it sees), the training flag and the block's residual taus;
* the root keeps the other nodes and calls each block through ``call_block`` with the
  original arguments, so the block's ``__call__`` (hooks, wrappers) runs;
* a kept prefix stands for the whole list: the root's calls are unrolled to every
  block (``unroll_calls``) when the calls form a chain (each block's output feeds the
  next one, all other arguments shared);
* a block that is a whole residual branch of its parent (``x = x + block(x)`` in the
  parent's loop) reads the residual split's branch side of its argument: the split and
  the add stay in the root, which passes the branch side as the block's argument
  (``_branch_entries``). Such calls chain through the root's adds, not directly, so
  ``transform`` captures every block of that list (``full``).

Reads: ``program.module_call_graph``; ``nn_module_stack``; ``umup.kind`` / ``umup.param``
/ ``umup.norm_scale`` on placeholders; ``umup.residual`` on residual ops; ``umup.training`` (graph).
Writes: new ``fx.GraphModule`` objects (the flat graph is not modified).
Fails when: a block's nodes read a value its call does not pass, or two blocks of one
structure key rewrite differently: ``RegionError``; ``transform`` then captures all
blocks (``capture(..., full=True)``) or runs the model as one graph, and says so.
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
    """Call the block at ``path`` of ``root`` as the model would (its ``__call__`` runs
    hooks, checkpoint and compile wrappers), under ``torch.utils.checkpoint`` with
    ``checkpoint``'s options where the model's forward checkpointed it; its output,
    flattened."""
    block = root.get_submodule(path)
    if checkpoint is None:
        return pytree.tree_leaves(block(*args, **kwargs))
    return pytree.tree_leaves(torch.utils.checkpoint.checkpoint(block, *args, **checkpoint, **kwargs))



def _region_of(node: fx.Node, paths: list[str]) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    for path, _ in stack.values():
        path = canonical_name(path.split("@")[0])
        for p in paths:
            if path == p or path.startswith(p + "."):
                return p
    return ""


def assign_regions(gm: fx.GraphModule, paths: list[str]) -> dict[fx.Node, str]:
    """Block path (or "" for the root) of every call_function node."""
    region: dict[fx.Node, str] = {}
    pending = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        r = _region_of(node, paths)
        if r is None:
            pending.append(node)
        else:
            region[node] = r
    for node in reversed(pending):  # inserted nodes go with their users
        users = {region.get(u, "") for u in node.users if u.op != "output"}
        region[node] = users.pop() if len(users) == 1 else ""
    return region


def _branch_entries(gm: fx.GraphModule, sig: Any, by_name: dict[str, fx.Node],
                    region: dict[fx.Node, str], block: str) -> dict[int, fx.Node]:
    """{input leaf: branch input} for a block that is a whole residual branch of its
    parent (``x = x + block(x)`` in the parent's loop): the block reads the residual
    split's branch side of its argument, which the root computes and passes instead
    (rules §4: the split belongs to the skip, in the root, next to the add)."""
    first = {}
    for i, a in enumerate(sig.inputs):
        if not isinstance(a, ConstantArgument) and a.name in by_name:
            first.setdefault(by_name[a.name], i)
    entries = {}
    for node in gm.graph.nodes:
        if (region.get(node) == block and node.target is operator.getitem
                and node.args[1] == 0 and isinstance(node.args[0], fx.Node)
                and node.args[0].target is ops.residual_split
                and region.get(node.args[0]) != block  # the split sits in the root
                and node.args[0].args[0] in first):
            region[node] = ""
            entries[first[node.args[0].args[0]]] = node
    return entries


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


def _block_graph(
    gm: fx.GraphModule,
    block: str,
    nodes: list[fx.Node],
    call: Any,
    by_name: dict[str, fx.Node],
    targets: dict[str, tuple[str, Any]],
    constants: dict[str, torch.Tensor],
    entries: dict[int, fx.Node],
) -> RegionGraph:
    sig = call.signature
    b = _Builder()
    leaves: list[Any] = []
    for i, a in enumerate(sig.inputs):
        if isinstance(a, ConstantArgument):
            leaves.append(a.value)
            continue
        leaves.append(TENSOR)
        src = entries.get(i, by_name[a.name])
        if src in b.env:  # the same value passed twice: one placeholder is enough
            b.placeholder(f"arg{i}", ("input", i))
            continue
        b.placeholder(f"arg{i}", ("input", i), like=src)
    members = set(nodes)
    sizes: list[fx.Node] = []
    for node in nodes:
        for inp in node.all_input_nodes:
            if inp in b.env or inp in members or inp in sizes:
                continue
            if inp.op != "placeholder":
                if not isinstance(inp.meta.get("val"), torch.SymInt):
                    raise RegionError(
                        f"block {block} reads {inp.name} ({inp.op}), which its call does not pass"
                    )
                sizes.append(inp)  # a size the root computed: recomputed in the block
                continue
            kind, target = targets[inp.name]
            if kind in ("param", "buffer"):
                rel = _relative(canonical_name(target), block)
                if rel is None:
                    raise RegionError(f"block {block} uses {target}, which it does not own")
                b.placeholder(inp.name, (kind, rel), like=inp)
            elif kind == "constant":
                b.placeholder(inp.name, ("constant", target), like=inp)
            elif kind == "training":
                b.placeholder(inp.name, ("training", None), like=inp)
            else:
                raise RegionError(f"block {block} reads model input {inp.name} directly")
    for size in sizes:
        _size_in_block(b, size, block)
    for node in nodes:
        b.copy(node)
    out_nodes = _leaf_nodes(sig.outputs, by_name)
    out_leaves = [v if not isinstance(v, fx.Node) else TENSOR for v in out_nodes]
    try:
        outs = [b.env[n] for n in out_nodes if isinstance(n, fx.Node)]
    except KeyError as exc:
        raise RegionError(f"block {block} returns a value it does not compute") from exc
    b.graph.output(tuple(outs))
    _taus_as_input(b)
    used = {t for k, t in b.inputs if k == "constant"}
    return RegionGraph(
        fx.GraphModule(gm, b.graph, class_name=f"umup_{block.replace('.', '_')}"),
        b.inputs,
        [("user", None)] * len(outs),
        sig.in_spec,
        leaves,
        sig.out_spec,
        out_leaves,
        {k: v for k, v in constants.items() if k in used},
        block,
    )


_SYM_SIZE = torch.ops.aten.sym_size.int


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


def _taus_as_input(b: _Builder) -> None:
    """Residual ops read tau from the block's ``_umup_taus`` (one graph, many depths)."""
    residual = [
        n for n in b.graph.nodes
        if n.op == "call_function" and n.target in (ops.residual_split, ops.residual_add)
    ]
    if not residual:
        return
    order = sorted({meta.get(n, meta.RESIDUAL).index for n in residual})
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
    blocks: dict[str, RegionGraph]  # kept block path -> its graph
    calls: list[tuple[str, fx.Node]]  # (block path, call node) in the root graph, in order


def split_regions(
    gm: fx.GraphModule,
    program: ExportedProgram,
    block_paths: list[str],
    example_leaves: list[Any],
    name: str,
    checkpointed: dict[str, dict[str, Any]] | None = None,
) -> Split:
    """Cut ``gm`` (rewritten) into the root graph and one graph per kept block; the root
    calls the blocks in ``checkpointed`` under ``torch.utils.checkpoint``."""
    by_name = {n.name: n for n in gm.graph.nodes}
    for old, new in meta.graph_meta(gm).get(meta.REPLACED, {}).items():
        by_name.setdefault(old, by_name[new])
    targets = _placeholder_targets(program, gm)
    constants = dict(program.constants)
    calls = {e.fqn: e for e in program.module_call_graph if e.fqn in block_paths}
    if set(calls) != set(block_paths) or any(e.signature is None for e in calls.values()):
        raise RegionError("the export did not record every block call")
    region = assign_regions(gm, block_paths)
    entries = {p: _branch_entries(gm, calls[p].signature, by_name, region, p) for p in block_paths}
    members: dict[str, list[fx.Node]] = {p: [] for p in block_paths}
    for node in gm.graph.nodes:
        r = region.get(node, "")
        if r:
            members[r].append(node)
    blocks = {
        p: _block_graph(gm, p, members[p], calls[p], by_name, targets, constants, entries[p])
        for p in block_paths
        if members[p]
    }
    # The root: every other node, with one call per block at its last node's place.
    b = _Builder()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            b.placeholder(node.name, targets[node.name], like=node)
    root_ph = b.graph.placeholder("umup_self")
    b.inputs.append(("module", None))
    last = {p: members[p][-1] for p in blocks}
    call_nodes: list[tuple[str, fx.Node]] = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            continue
        r = region.get(node, "")
        if r and r in blocks:
            if node is last[r]:
                call_nodes.append((r, _emit_call(b, root_ph, r, calls[r].signature, by_name,
                                                 entries[r], (checkpointed or {}).get(r))))
            continue
        if node.op == "output":
            b.graph.output(fx.node.map_arg(node.args[0], lambda n: b.env[n]))
            continue
        try:
            b.copy(node)
        except KeyError as exc:
            raise RegionError(f"root node {node.name} reads a value inside a block") from exc
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
    _drop_unused_placeholders(b)
    used = {t for k, t in b.inputs if k == "constant"}
    root = RegionGraph(
        fx.GraphModule(gm, b.graph, class_name="umup_root"),
        b.inputs,
        outputs,
        program.call_spec.in_spec,
        example_leaves,
        program.call_spec.out_spec,
        [],
        {k: v for k, v in constants.items() if k in used},
        name,
    )
    return Split(root, blocks, call_nodes)


def _drop_unused_placeholders(b: _Builder) -> None:
    """The root does not read the blocks' weights (each block reads its own, at its call:
    under FSDP2 only then are they unsharded); dead size reads go too."""
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


def _emit_call(b: _Builder, root_ph: fx.Node, path: str, sig: Any, by_name: dict[str, fx.Node],
               entries: dict[int, fx.Node], checkpoint: dict[str, Any] | None) -> fx.Node:
    leaves = [b.env[entries.get(i, v)] if isinstance(v, fx.Node) else v
              for i, v in enumerate(_leaf_nodes(sig.inputs, by_name))]
    args, kwargs = pytree.tree_unflatten(leaves, sig.in_spec)
    call = b.graph.call_function(call_block,
                                 (root_ph, path, tuple(args), dict(kwargs), checkpoint))
    call.meta["umup_call"] = {"path": path, "in_spec": sig.in_spec, "leaves": leaves}
    for i, out in enumerate(_leaf_nodes(sig.outputs, by_name)):
        if isinstance(out, fx.Node):
            item = b.graph.call_function(operator.getitem, (call, i))
            item.meta["val"] = out.meta.get("val")
            b.env[out] = item
    return call


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
            call = graph.call_function(
                call_block, (last.args[0], path, tuple(args), dict(kwargs), last.args[4])
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
