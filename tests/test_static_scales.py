"""Scales fixed at reference sizes (rules §3, "Reference sizes"): causal at every length,
gradients independent of how a batch is split, dropout's eval = its train mean, and a
loss computed outside the model. Each is checked against the truth it promises: the
full batch's gradient, the shorter sequence's logits, the mean of many train outputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import umup_fx
from examples.llama import Llama, LlamaConfig

V, T = 64, 16


def _llama(seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    return Llama(LlamaConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=2, max_seq_len=64))


def _ids(b: int, t: int, seed: int) -> Tensor:
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


def _close_rel(a: Tensor, b: Tensor, rel: float) -> None:
    err = (a - b).abs().max().item() / b.abs().max().item()
    assert err <= rel, f"relative difference {err:.2e} > {rel:.0e}"


# -- causal at every length --------------------------------------------------------------
def test_example_llama_first_positions_do_not_depend_on_later_ones() -> None:
    idx = _ids(2, 2 * T, seed=1)
    model = umup_fx.transform(_llama(), (idx[:, :T],))
    with torch.no_grad():
        short, long = model(idx[:, :T]), model(idx)
    _close_rel(long[:, :T], short, 1e-5)


def test_hf_llama_first_positions_do_not_depend_on_later_ones() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(cfg)
    idx = _ids(2, 2 * T, seed=2)
    umup_fx.transform(model, (), {"input_ids": idx[:, :T], "use_cache": False})
    with torch.no_grad():
        short = model(input_ids=idx[:, :T], use_cache=False).logits
        long = model(input_ids=idx, use_cache=False).logits
    _close_rel(long[:, :T], short, 1e-5)


# -- gradients do not depend on how a batch is split ------------------------------------
def _flat_grad(model: nn.Module) -> Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def _accumulated(model: nn.Module, idx: Tensor, tgt: Tensor, sizes: list[int], loss_outside: bool) -> Tensor:
    """Micro-batches of ``sizes`` rows, each mean loss weighted by its share of the
    batch's tokens (HF Trainer's convention); returns the accumulated gradient."""
    model.zero_grad()
    start = 0
    for n in sizes:
        x, y = idx[start : start + n], tgt[start : start + n]
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten()) if loss_outside else model(x, y)
        (loss * n / idx.shape[0]).backward()
        start += n
    return _flat_grad(model)


@pytest.mark.parametrize("loss_outside", [False, True])
def test_accumulated_gradients_equal_the_full_batch(loss_outside: bool) -> None:
    idx, tgt = _ids(8, T, seed=3), _ids(8, T, seed=4)
    example = (idx[:2],) if loss_outside else (idx[:2], tgt[:2])
    model = umup_fx.transform(_llama(), example)
    full = _accumulated(model, idx, tgt, [8], loss_outside)
    assert full.norm() > 0
    for sizes in ([2, 2, 2, 2], [6, 2]):
        split = _accumulated(model, idx, tgt, sizes, loss_outside)
        cosine = F.cosine_similarity(split, full, dim=0).item()
        assert cosine >= 0.9999, (sizes, cosine)
        assert split.norm().item() == pytest.approx(full.norm().item(), rel=0.01), sizes


def test_the_loss_outside_the_model_gives_the_in_graph_gradients() -> None:
    """F.cross_entropy on returned logits trains as the model's own loss would."""
    idx, tgt = _ids(4, T, seed=5), _ids(4, T, seed=6)
    inside = umup_fx.transform(_llama(), (idx, tgt))
    outside = umup_fx.transform(_llama(), (idx,))
    outside.load_state_dict(inside.state_dict())
    inside(idx, tgt).backward()
    F.cross_entropy(outside(idx).flatten(0, 1), tgt.flatten()).backward()
    grads_in = dict(inside.named_parameters())
    for name, p in outside.named_parameters():
        if p.grad is None:
            continue
        torch.testing.assert_close(p.grad, grads_in[name].grad, rtol=1e-4, atol=1e-6)
    # Unit scale at init, not the 1/rows of a plain mean (the issue: 0.0035 vs 0.74).
    for name in ("lm_head.weight", "layers.0.mlp.gate_proj.weight"):
        rms = grads_in[name].grad.pow(2).mean().sqrt().item()
        assert 0.1 < rms < 10, (name, rms)


# -- dropout: eval output = mean of train outputs ----------------------------------------
class _Dropouts(nn.Module):
    def __init__(self, kind: str, p: float = 0.3) -> None:
        super().__init__()
        self.kind, self.p = kind, p
        self.qkv = nn.Linear(32, 96)
        self.out = nn.Linear(32, 32)
        self.drop = nn.Dropout(p)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 16)).permute(2, 0, 3, 1, 4)
        if self.kind == "sdpa":  # HF's convention: p only while training
            h = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.p if self.training else 0.0
            )
        else:
            h = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h.transpose(1, 2).flatten(2)
        if self.kind == "module":
            h = self.drop(h)
        elif self.kind == "functional":
            h = F.dropout(h, self.p, self.training)
        return self.out(h)


@pytest.mark.parametrize("kind", ["module", "functional", "sdpa"])
def test_dropout_eval_equals_the_mean_of_train(kind: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 8, 32)
    model = umup_fx.transform(_Dropouts(kind), (x,))
    with torch.no_grad():
        model.eval()
        want = model(x)[0]
        model.train()  # 4000 copies of x in one batch: 4000 independent dropout masks
        mean = model(x.expand(4000, -1, -1)).mean(0)
    ratio = (mean * want).sum() / (want * want).sum()
    assert ratio.item() == pytest.approx(1.0, abs=0.01)  # 0.885 for SDPA before
    assert (mean - want).abs().mean() < 0.05 * want.abs().mean()



class _SumOverItems(nn.Module):
    """HF's loss under Trainer: a sum divided by the batch's item count."""

    def __init__(self) -> None:
        super().__init__()
        self.model = _llama()

    def forward(self, idx: Tensor, targets: Tensor, num_items: Tensor) -> Tensor:
        logits = self.model(idx)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
        return loss / num_items


def test_a_sum_divided_by_the_item_count_is_a_mean() -> None:
    idx, tgt = _ids(4, T, seed=8), _ids(4, T, seed=9)
    mean = umup_fx.transform(_llama(), (idx, tgt))
    summed = umup_fx.transform(_SumOverItems(), (idx, tgt, torch.tensor(float(tgt.numel()))))
    weights = mean.state_dict()
    del weights["_extra_state"]  # the root's settings: summed.model is not a root
    summed.model.load_state_dict(weights)
    mean(idx, tgt).backward()
    summed(idx, tgt, torch.tensor(float(tgt.numel()))).backward()
    for name, p in summed.model.named_parameters():
        want = dict(mean.named_parameters())[name].grad
        if want is not None:
            torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-6)
