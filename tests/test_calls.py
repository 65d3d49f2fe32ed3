"""A transformed model takes every call its original takes (issue 20 item 1, issue 21).

Truth is the model itself: the loss it computes with ``labels`` against the
cross-entropy of the logits it returns without them, the same model's greedy tokens
by full forwards, the untransformed class's signature.
"""

from __future__ import annotations

import inspect
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import umup_fx
from umup_fx.errors import CallError
from umup_fx.runtime import modules
from umup_fx.runtime.modules import graphs_of

transformers = pytest.importorskip("transformers")

VOCAB = 64


def _llama(use_cache: bool = True) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, use_cache=use_cache)
    return transformers.LlamaForCausalLM(cfg)


def _ids(batch: int = 2, seq: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def llama() -> tuple[nn.Module, inspect.Signature]:
    """Transformed with labels and HF's default use_cache=True."""
    model = _llama()
    signature = inspect.signature(model.forward)
    x = _ids()
    umup_fx.transform(model, (), {"input_ids": x, "labels": x})
    return model, signature


def test_transform_with_default_use_cache_keeps_signature(llama) -> None:
    model, signature = llama
    assert model.config.use_cache is True  # turned off for the capture only
    assert inspect.signature(model.forward) == signature


def test_call_without_labels_gives_the_logits_of_the_loss(llama) -> None:
    model, _ = llama
    x = _ids(batch=3, seq=10, seed=2)  # another batch and length too
    state = {k: v.clone() for k, v in model.state_dict().items()}
    groups = [(g["names"], g["lr"]) for g in umup_fx.AdamW(model, lr=0.1).param_groups]
    with torch.no_grad():
        loss = model(input_ids=x, labels=x).loss
        logits = model(input_ids=x).logits  # a structure not seen before: captured now
    expected = umup_fx.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    torch.testing.assert_close(loss, expected)
    # the new capture kept the weights, the plan's groups, and the blocks' graphs
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert [(g["names"], g["lr"]) for g in umup_fx.AdamW(model, lr=0.1).param_groups] == groups
    assert all(len(graphs_of(layer)) == 1 for layer in model.model.layers)
    assert len(graphs_of(model)) >= 2


def test_attention_mask_and_padding(llama) -> None:
    model, _ = llama
    x = _ids(batch=2, seq=10, seed=3)
    mask = torch.ones_like(x)
    mask[1, 7:] = 0  # right padding: the first 7 positions cannot see it
    with torch.no_grad():
        full = model(input_ids=x).logits
        masked = model(input_ids=x, attention_mask=mask).logits
        short = model(input_ids=x[1:, :7]).logits
    torch.testing.assert_close(masked[0], full[0])
    torch.testing.assert_close(masked[1, :7], short[0], atol=1e-5, rtol=1e-5)


def test_generate_without_cache_is_greedy_full_forward(llama) -> None:
    model, _ = llama
    prompt = _ids(batch=1, seq=4, seed=4)
    model.eval()
    try:
        out = model.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=False)
        ids = prompt
        with torch.no_grad():
            for _ in range(4):
                nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
                ids = torch.cat([ids, nxt], dim=1)
        assert torch.equal(out, ids)
        with pytest.raises(CallError, match="use_cache=False"):
            model.generate(prompt, max_new_tokens=2, do_sample=False)  # HF's default cache
    finally:
        model.train()


def test_num_items_in_batch_divides_the_summed_loss(llama) -> None:
    model, _ = llama
    x = _ids(seed=5)
    n = torch.tensor(x[:, 1:].numel())
    with torch.no_grad():
        mean = model(input_ids=x, labels=x).loss
        summed = model(input_ids=x, labels=x, num_items_in_batch=n).loss
    torch.testing.assert_close(summed, mean)


def test_num_items_in_batch_keeps_unit_gradients(llama) -> None:
    model, _ = llama
    x = _ids(seed=6)

    def grads(**kwargs: torch.Tensor) -> dict[str, torch.Tensor]:
        model.zero_grad()
        model(input_ids=x, labels=x, **kwargs).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    mean, summed = grads(), grads(num_items_in_batch=torch.tensor(x[:, 1:].numel()))
    model.zero_grad()
    for name in mean:
        torch.testing.assert_close(summed[name], mean[name])


def test_trainer_with_default_arguments(tmp_path) -> None:
    model = _llama()
    pattern = torch.arange(16) % 8
    data = [{"input_ids": pattern.clone(), "labels": pattern.clone()} for _ in range(32)]
    x = torch.stack([d["input_ids"] for d in data[:2]])
    umup_fx.transform(model, (), {"input_ids": x, "labels": x})
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, per_device_train_batch_size=4,
        max_steps=12, logging_steps=4, save_strategy="no")
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=data,
        optimizers=(umup_fx.AdamW(model, lr=0.05), None))
    assert trainer.model_accepts_loss_kwargs  # so it passes num_items_in_batch
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.2


class _KwargsLM(nn.Module):
    """``forward(self, ids, **kwargs)``: the loss when ``kwargs`` hold targets."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 32)
        self.layers = nn.ModuleList(nn.Linear(32, 32) for _ in range(2))
        self.out = nn.Linear(32, VOCAB)

    def forward(self, ids: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        for layer in self.layers:
            h = h + F.silu(layer(h))
        logits = self.out(h)
        if "targets" in kwargs:
            return F.cross_entropy(logits.flatten(0, 1), kwargs["targets"].flatten())
        return logits


def test_var_keyword_forward_and_structure_bound(monkeypatch) -> None:
    model = _KwargsLM()
    signature = inspect.signature(model.forward)
    x = _ids()
    umup_fx.transform(model, (x,), {"targets": x})  # torch.export alone fails here
    assert inspect.signature(model.forward) == signature
    loss = model(x, targets=x)
    with torch.no_grad():  # captured under no_grad, for evaluation ...
        logits = model(x)
    torch.testing.assert_close(loss, umup_fx.cross_entropy(logits.flatten(0, 1), x.flatten()))
    model(x).pow(2).mean().backward()  # ... and still trains
    assert all(p.grad is not None for p in model.parameters())
    monkeypatch.setattr(modules, "MAX_CALL_STRUCTURES", 2)
    with pytest.raises(CallError, match="at most 2"):
        model(ids=x)  # a third structure (keyword instead of positional)


class _ParentLoopResidual(nn.Module):
    """Blocks are ``nn.Sequential``; the residual add is in the parent's loop."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
            for _ in range(3))
        self.out = nn.Linear(16, VOCAB)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        for block in self.blocks:
            h = h + block(h)
        return F.cross_entropy(self.out(h).flatten(0, 1), targets.flatten())


def _loss_and_grads(cls: type, one_graph: bool, monkeypatch) -> tuple[nn.Module, torch.Tensor, dict]:
    torch.manual_seed(0)
    model = cls()
    x = _ids(seq=8)
    with monkeypatch.context() as m:
        if one_graph:  # how it ran before: no blocks found, one graph
            m.setattr(umup_fx.capture.blocks, "find_blocks", lambda model: [])
        torch.manual_seed(1)
        umup_fx.transform(model, (x, x))
    loss = model(x, x)
    loss.backward()
    return model, loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_residual_add_in_the_parents_loop_keeps_blocks(monkeypatch) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", umup_fx.OneGraphWarning)
        model, loss, grads = _loss_and_grads(_ParentLoopResidual, False, monkeypatch)
    assert all(isinstance(b, modules.UmupBlock) for b in model.blocks)
    assert len({id(graphs_of(b)[0]) for b in model.blocks}) == 1  # one graph, shared
    _, loss1, grads1 = _loss_and_grads(_ParentLoopResidual, True, monkeypatch)
    torch.testing.assert_close(loss, loss1)
    assert grads.keys() == grads1.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads1[name])


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.silu(self.fc1(x)))


class _CheckpointingLM(nn.Module):
    """Checkpoints its blocks from its own forward (``whole``) or a closure (not)."""

    def __init__(self, how: str | None) -> None:
        super().__init__()
        self.how = how
        self.emb = nn.Embedding(VOCAB, 16)
        self.layers = nn.ModuleList(_Block() for _ in range(3))
        self.out = nn.Linear(16, VOCAB)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.how == "closure":
            h = checkpoint(lambda t: self.emb(t), ids, use_reentrant=False)
        else:
            h = self.emb(ids)
        for layer in self.layers:
            h = checkpoint(layer, h, use_reentrant=False) if self.how == "whole" else layer(h)
        return F.cross_entropy(self.out(h).flatten(0, 1), targets.flatten())


class _CheckpointWrapper(nn.Module):
    """A user's own checkpoint wrapper around a block."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.block, x, use_reentrant=False)


def _run_checkpointing(how: str | None) -> tuple[nn.Module, list[int], dict]:
    torch.manual_seed(0)
    model = _CheckpointingLM(None if how == "wrapper" else how)
    if how == "wrapper":
        model.layers = nn.ModuleList(_CheckpointWrapper(b) for b in model.layers)
    x = _ids(seq=8)
    torch.manual_seed(1)
    umup_fx.transform(model, (x, x))
    calls = [0]
    for layer in model.layers:
        layer.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    loss = model(x, x)
    counts = [calls[0]]
    loss.backward()
    counts.append(calls[0])
    return model, counts, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("how", ["whole", "wrapper"])
def test_checkpoint_in_forward_is_kept(how: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", umup_fx.CheckpointWarning)
        _, counts, grads = _run_checkpointing(how)
    assert counts == [3, 6]  # each block recomputed once in the backward
    _, plain_counts, plain_grads = _run_checkpointing(None)
    assert plain_counts == [3, 3]
    for name, grad in plain_grads.items():
        if how == "wrapper":  # the wrapper adds a segment: layers.0.block.fc1.weight
            name = re.sub(r"^layers\.(\d+)", r"layers.\1.block", name)
        torch.testing.assert_close(grads[name], grad)


def test_checkpoint_of_a_closure_is_warned() -> None:
    with pytest.warns(umup_fx.CheckpointWarning, match="lambda"):
        _run_checkpointing("closure")


class _IndexedBlocks(nn.Module):
    """Calls its blocks by index, so a capture of a prefix of them cannot run."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.layers = nn.ModuleList(_Block() for _ in range(3))
        self.out = nn.Linear(16, VOCAB)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        h = self.layers[2](self.layers[1](self.layers[0](self.emb(ids))))
        return F.cross_entropy(self.out(h).flatten(0, 1), targets.flatten())


def test_forward_that_indexes_its_blocks_keeps_them(monkeypatch) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", umup_fx.OneGraphWarning)
        model, loss, _ = _loss_and_grads(_IndexedBlocks, False, monkeypatch)
    assert all(isinstance(b, modules.UmupBlock) for b in model.layers)
    _, loss1, _ = _loss_and_grads(_IndexedBlocks, True, monkeypatch)
    torch.testing.assert_close(loss, loss1)


# -- the original model's errors and non-tensor arguments (issue 30 item 4) ----------


def _own_error(model: nn.Module, **kwargs: torch.Tensor) -> BaseException:
    with pytest.raises(Exception) as own:
        model(**kwargs)
    return own.value


@pytest.mark.parametrize("call", ["float_labels", "1d_input_ids", "short_labels"])
def test_a_call_the_plain_model_rejects_gets_its_own_error(llama, call: str) -> None:
    model, _ = llama
    x = _ids()
    kwargs = {"float_labels": {"input_ids": x, "labels": x.float()},
              "1d_input_ids": {"input_ids": x[0], "labels": x[0]},
              "short_labels": {"input_ids": x, "labels": x[:, :8]}}[call]
    plain = _own_error(_llama(), **kwargs)
    ours = _own_error(model, **kwargs)
    assert type(ours) is type(plain) and str(ours) == str(plain)  # not a CallError


def test_a_mask_the_plain_model_takes_only_for_its_values_is_refused_with_why(llama) -> None:
    model, _ = llama
    x, mask = _ids(), torch.ones(12, dtype=torch.long)  # 1-D: dropped as all ones
    with torch.no_grad():
        _llama()(input_ids=x, attention_mask=mask)  # the plain model runs it
    with pytest.raises(CallError, match=r"values.*attention_mask of input_ids' shape"):
        model(input_ids=x, attention_mask=mask)


def test_a_block_called_directly_names_only_what_differs(llama) -> None:
    model, _ = llama
    with pytest.raises(CallError) as err:
        model.model.layers[0](torch.randn(2, 12, 32))
    text = str(err.value)
    assert "keyword arguments ['attention_mask'" in text and "call the model" in text
    assert text.count("position_ids") == 1


def test_3d_input_ids_of_gpt2_run_as_a_new_structure() -> None:
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
        bos_token_id=0, eos_token_id=0))
    x = _ids()
    umup_fx.transform(model, (), {"input_ids": x, "labels": x}, check=False)
    model.eval()  # no dropout
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its own sizes: a leading axis of 1 is fixed
        flat = model(input_ids=x, use_cache=False).logits
        nested = model(input_ids=x.view(1, 2, 12), use_cache=False).logits  # GPT-2 flattens
    assert nested.shape == (1, 2, 12, VOCAB)
    torch.testing.assert_close(nested[0], flat)


class _ScaledLM(nn.Module):
    """``forward(self, scale, ids, flip=False)``: ``scale`` multiplies the embedding's
    output (a constant u-muP drops), ``flip`` negates the residual stream."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(2))
        self.out = nn.Linear(16, VOCAB)

    def forward(self, scale: float, ids: torch.Tensor, flip: bool = False) -> torch.Tensor:
        h = self.emb(ids) * scale
        for layer in self.layers:
            h = h + F.silu(layer(h))
        return self.out(-h if flip else h)


def test_a_changed_non_tensor_argument_is_honoured_or_refused() -> None:
    torch.manual_seed(0)
    model, x = _ScaledLM(), _ids(seq=8)
    umup_fx.transform(model, (2.0, x), check=False)
    with torch.no_grad():
        flipped = model(2.0, x, flip=True)  # a new structure, honoured
        twin = _ScaledLM()
        umup_fx.transform(twin, (2.0, x), {"flip": True}, check=False)
        twin.load_state_dict(model.state_dict())
        torch.testing.assert_close(flipped, twin(2.0, x, flip=True))
        assert not torch.allclose(flipped, model(2.0, x))
        with pytest.raises(CallError, match=r"h = self.emb\(ids\) \* scale \(2.0 in a call "
                                            r"before, 3.0 now\).*no effect"):
            model(3.0, x)  # only the embedding's multiplier, which u-muP drops


def test_a_tensor_scale_argument_is_the_callers_not_a_model_constant() -> None:
    """A one-element tensor argument on the embedding's output stays in the graph (it
    was dropped as the model's own scale, so every value gave the same output)."""
    torch.manual_seed(0)
    model, x = _ScaledLM(), _ids(seq=8)
    umup_fx.transform(model, (torch.tensor(2.0), x), check=False)
    with torch.no_grad():
        three = model(torch.tensor(3.0), x)
        model.emb.weight.mul_(1.5)  # 2 x (1.5 W) = 3 x W: the same embedding output
        torch.testing.assert_close(model(torch.tensor(2.0), x), three)
