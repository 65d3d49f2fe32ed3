"""The transformed model keeps its module tree: blocks, hooks, checkpointing, meta init."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import umup_fx
from examples.llama import Block, Llama, LlamaConfig
from tests.tiny_models import hf_llama


def _config(layers: int = 4) -> LlamaConfig:
    return LlamaConfig(d_model=64, n_layers=layers, n_heads=4, n_kv_heads=2, max_seq_len=32)


def _batch(seed: int = 1, b: int = 2, s: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, s), generator=gen), torch.randint(0, 256, (b, s), generator=gen)


def _transformed(layers: int = 4, seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    model = Llama(_config(layers))
    torch.manual_seed(seed + 1)
    return umup_fx.transform(model, _batch())


def test_module_tree_classes_names_and_blocks_run_their_own_graph() -> None:
    model = _transformed()
    assert isinstance(model, Llama) and isinstance(model, umup_fx.UmupModule)
    assert all(isinstance(b, Block) and isinstance(b, umup_fx.UmupBlock) for b in model.layers)
    assert [n for n, _ in model.named_parameters()] == [
        n for n, _ in Llama(_config()).named_parameters()
    ]
    # Blocks of one structure share one graph (one compile); taus differ per block.
    assert model.layers[0].graph_module is model.layers[3].graph_module
    taus = [b._umup_taus for b in model.layers]
    assert len({tuple(t) for t in taus}) == 4
    flat = [b.tau for b in model.umup_plan.branches]
    assert [t for ts in taus for t in ts] == pytest.approx(flat)
    # Calling a block by itself runs its u-muP graph: the residual stream keeps unit
    # scale, where the unscaled block (x + f(x)) would grow it.
    x = torch.randn(2, 16, 64)
    y = model.layers[2](x)
    assert y.shape == x.shape and 0.8 < y.std().item() < 1.25


def test_hooks_on_blocks_fire_and_see_u_mup_activations() -> None:
    model = _transformed()
    seen = []
    handles = [
        b.register_forward_pre_hook(lambda m, args, i=i: seen.append(("pre", i)))
        for i, b in enumerate(model.layers)
    ]
    handles.append(model.layers[1].register_forward_hook(
        lambda m, args, out: seen.append(("out", out.std().item()))
    ))
    model(*_batch())
    assert [s for s in seen if s[0] == "pre"] == [("pre", i) for i in range(4)]
    (std,) = [v for k, v in seen if k == "out"]
    assert 0.8 < std < 1.25
    for h in handles:
        h.remove()


def test_long_model_matches_full_capture() -> None:
    """Capturing two blocks and reusing them equals capturing all eight."""
    import umup_fx.capture.blocks as regions

    def run(full: bool) -> tuple[float, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model = Llama(_config(8))
        saved = regions.choose_prefix
        if full:
            regions.choose_prefix = lambda blocks, full=False: saved(blocks, True)
        try:
            torch.manual_seed(1)
            umup_fx.transform(model, _batch())
        finally:
            regions.choose_prefix = saved
        loss = model(*_batch(seed=3, b=3, s=9))
        loss.backward()
        return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    (loss_a, grads_a), (loss_b, grads_b) = run(False), run(True)
    assert loss_a == loss_b
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 40
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=0, atol=0)


def _saved_bytes(model: torch.nn.Module, step=None) -> int:
    """Bytes autograd saves for backward over one forward + backward of ``step(model)``."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        (step or (lambda m: m(*_batch(b=4, s=32))))(model).backward()
    return total


def test_activation_checkpointing_after_transform_recomputes() -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing,
    )

    plain = _transformed()
    wrapped = _transformed()
    loss_plain = plain(*_batch())
    apply_activation_checkpointing(wrapped, check_fn=lambda m: isinstance(m, Block))
    assert "_checkpoint_wrapped_module" in next(
        n for n, _ in wrapped.named_parameters() if "layers" in n
    )
    assert wrapped(*_batch()).item() == pytest.approx(loss_plain.item(), rel=1e-6)
    assert _saved_bytes(wrapped) < 0.5 * _saved_bytes(plain)
    # Optimizer groups are found through the wrapper's name prefix.
    opt = umup_fx.AdamW(wrapped, lr=2**-4)
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(
        p.requires_grad for p in wrapped.parameters()
    )


def test_checkpoint_around_a_transformed_block_recomputes() -> None:
    model = _transformed()
    x = torch.randn(2, 16, 64, requires_grad=True)
    plain = _saved_bytes(model.layers[0], lambda b: b(x).sum())
    wrapped = _saved_bytes(model.layers[0], lambda b: checkpoint(b, x, use_reentrant=False).sum())
    assert wrapped < 0.5 * plain
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_meta_device_flow() -> None:
    """Build on meta, transform without weights, materialise, init_, train."""
    with torch.device("meta"):
        model = Llama(_config(8))
    idx = torch.randint(0, 256, (2, 16))
    umup_fx.transform(model, (idx.to("meta"), idx.to("meta")))
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    reference = Llama(_config(8))  # the model's own buffers (RoPE tables) are its business
    for name, buffer in reference.named_buffers():
        model.get_buffer(name).copy_(buffer)
    torch.manual_seed(5)
    umup_fx.init_(model)
    first = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(5)
    umup_fx.init_(model)
    for n, p in model.named_parameters():
        assert torch.equal(p, first[n]), n  # deterministic under manual_seed
    w = model.layers[5].attn.q_proj.weight
    assert abs(w.std().item() - 1) < 0.1 and not model.layers[5].norm1.weight.requires_grad
    opt = umup_fx.AdamW(model, lr=2**-4)
    losses = []
    for _step in range(3):
        opt.zero_grad()
        loss = model(*_batch(seed=7))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_hf_llama_blocks_are_kept() -> None:
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    ids = torch.randint(0, 256, (2, 16))
    model = umup_fx.transform(hf_llama(layers=4), (ids,), {"labels": ids})
    layers = model.model.layers
    assert all(isinstance(b, LlamaDecoderLayer) and isinstance(b, umup_fx.UmupBlock)
               for b in layers)
    assert layers[0].graph_module is layers[3].graph_module
    assert model.umup_plan.depth == 4 and len(model.umup_plan.branches) == 8
    assert torch.isfinite(model(ids, labels=ids).loss)


def test_compile_each_block_like_torchtitan() -> None:
    torch._dynamo.reset()
    model = _transformed(layers=6)
    eager = model(*_batch()).item()
    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    for i, block in enumerate(model.layers):
        model.layers.register_module(str(i), torch.compile(block, backend=count))
    assert model(*_batch()).item() == pytest.approx(eager, rel=1e-5)
    # One shared graph: compiled for the first block, then once with taus symbolic.
    assert len(graphs) <= 2


def test_activation_checkpointing_before_transform_is_kept() -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointWrapper,
        apply_activation_checkpointing,
    )

    torch.manual_seed(0)
    model = Llama(_config())
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, Block))
    torch.manual_seed(1)
    umup_fx.transform(model, _batch())
    assert all(isinstance(b, CheckpointWrapper) for b in model.layers)
    assert all(isinstance(b._checkpoint_wrapped_module, umup_fx.UmupBlock) for b in model.layers)
    plain = _transformed()
    assert model(*_batch()).item() == pytest.approx(plain(*_batch()).item(), rel=1e-6)
    assert _saved_bytes(model) < 0.5 * _saved_bytes(plain)
    assert "layers.0.attn.q_proj.weight" in model.umup_plan.params  # plan names: no wrapper


def test_hf_gradient_checkpointing_before_or_after_transform_recomputes() -> None:
    """HF checkpoints in the layer's __call__, which the rewritten block keeps."""
    pytest.importorskip("transformers")
    ids = torch.randint(0, 256, (4, 64))

    def saved(model: torch.nn.Module) -> int:
        return _saved_bytes(model, lambda m: m(ids, labels=ids).loss)

    plain = umup_fx.transform(hf_llama(layers=4), (ids,), {"labels": ids}).train()
    before = hf_llama(layers=4)
    before.gradient_checkpointing_enable()
    umup_fx.transform(before, (ids,), {"labels": ids}).train()
    without = saved(plain)
    assert saved(before) < 0.5 * without
    after = plain  # the same transformed model, checkpointing enabled now
    after.gradient_checkpointing_enable()
    after.train()
    assert saved(after) < 0.5 * without


class _AllHidden(torch.nn.Module):
    """The root reads every block's output (as models returning all hidden states do),
    and the blocks scale by their index (as GPT-2's scale_attn_by_inverse_layer_idx)."""

    def __init__(self, layers: int = 4, d: int = 32, indexed: bool = True) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(64, d)
        self.blocks = torch.nn.ModuleList(
            _IndexedBlock(i if indexed else 0, d) for i in range(layers)
        )
        self.head = torch.nn.Linear(d, 64)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x, seen = self.embed(idx), []
        for block in self.blocks:
            x = block(x)
            seen.append(x)
        return self.head(sum(seen[1:], seen[0]))


class _IndexedBlock(torch.nn.Module):
    def __init__(self, i: int, d: int) -> None:
        super().__init__()
        self.position = float(i + 1)  # a setting: part of the structure key
        self.fc = torch.nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Inside the branch: a constant on its output is the model's own branch
        # multiplier, which u-muP drops (rules §3), leaving the blocks alike.
        return x + self.fc(torch.relu(x) / self.position)


@pytest.mark.parametrize("indexed", [True, False])
def test_blocks_that_differ_or_do_not_chain_are_captured_whole(indexed: bool) -> None:
    """Distinct blocks each get their graph; identical blocks whose outputs the root
    reads (no chain to unroll) are all captured, sharing one graph."""
    torch.manual_seed(0)
    model = _AllHidden(indexed=indexed)
    idx = torch.randint(0, 64, (2, 8))
    umup_fx.transform(model, (idx,))
    assert all(isinstance(b, umup_fx.UmupBlock) for b in model.blocks)
    graphs = {id(b.graph_module) for b in model.blocks}
    assert len(graphs) == (4 if indexed else 1)
    assert len(model.umup_plan.branches) == 4
    out = model(idx)
    assert out.shape == (2, 8, 64) and torch.isfinite(out).all()


def test_hf_gpt2_regional_equals_one_graph() -> None:
    """GPT-2's blocks (Conv1D layout, tuple outputs): prefix capture == whole graph."""
    transformers = pytest.importorskip("transformers")
    import umup_fx.capture.blocks as regions

    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))

    def run(one_graph: bool) -> tuple[float, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        cfg = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=4, n_head=4,
                                      n_positions=64, use_cache=False)
        model = transformers.GPT2LMHeadModel(cfg)
        find = regions.find_blocks
        if one_graph:
            regions.find_blocks = lambda m: []
        try:
            torch.manual_seed(1)
            umup_fx.transform(model, (ids,), {"labels": ids})
        finally:
            regions.find_blocks = find
        assert one_graph or all(isinstance(b, umup_fx.UmupBlock) for b in model.transformer.h)
        out = model(ids, labels=ids)
        out.loss.backward()
        return out.loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    (loss, grads), (flat_loss, flat_grads) = run(False), run(True)
    assert loss == flat_loss and grads.keys() == flat_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], flat_grads[name], rtol=0, atol=0)
