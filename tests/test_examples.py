"""The plain-PyTorch example models and the byte-level corpus in examples/."""

from __future__ import annotations

import pytest
import torch

from examples.data import get_batch, load_corpus, train_val_split
from examples.gpt import GPT, GPTConfig
from examples.llama import Llama, LlamaConfig
from examples.mlp import MLPClassifier

B, T, V = 2, 16, 256


def _idx(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(V, (B, T), generator=g), torch.randint(V, (B, T), generator=g)


def _small_llama(n_kv_heads: int | None = None) -> Llama:
    torch.manual_seed(0)
    cfg = LlamaConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, max_seq_len=32)
    return Llama(cfg)


def _small_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=32, n_layer=2, n_head=4, n_embd=64))


def test_llama_config_defaults() -> None:
    cfg = LlamaConfig()
    assert cfg.n_kv_heads == cfg.n_heads
    assert cfg.d_ff is not None and cfg.d_ff % 32 == 0 and cfg.d_ff >= int(8 / 3 * cfg.d_model)
    assert LlamaConfig(d_model=64).d_ff == 192


@pytest.mark.parametrize(
    "make",
    [_small_llama, lambda: _small_llama(n_kv_heads=2), _small_gpt],
    ids=["llama", "llama_gqa", "gpt"],
)
def test_lm_forward(make) -> None:
    model = make()
    idx, targets = _idx()
    logits = model(idx)
    assert logits.shape == (B, T, V)
    loss = model(idx, targets)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert 4.5 < loss.item() < 7.0  # about ln(256) = 5.55 at init
    loss.backward()
    # Shorter sequences than the maximum work too.
    assert model(idx[:, :5]).shape == (B, 5, V)


def test_llama_is_causal() -> None:
    model = _small_llama(n_kv_heads=1)
    idx, _ = _idx()
    changed = idx.clone()
    changed[:, -1] = (changed[:, -1] + 1) % V
    torch.testing.assert_close(model(idx)[:, :-1], model(changed)[:, :-1])


def test_gpt_tied_head() -> None:
    model = _small_gpt()
    assert model.lm_head.weight is model.transformer.wte.weight


def test_mlp_classifier() -> None:
    torch.manual_seed(0)
    model = MLPClassifier(in_features=8, hidden=16, n_classes=5, depth=3)
    assert sum(isinstance(m, torch.nn.Linear) for m in model.modules()) == 3
    assert model(torch.randn(4, 8)).shape == (4, 5)


@pytest.mark.parametrize(
    "make",
    [_small_llama, lambda: _small_llama(n_kv_heads=2), _small_gpt, lambda: MLPClassifier(8, 16, 5)],
    ids=["llama", "llama_gqa", "gpt", "mlp"],
)
def test_export(make) -> None:
    model = make()
    x = torch.randn(B, 8) if isinstance(model, MLPClassifier) else _idx()[0]
    ep = torch.export.export(model, (x,), strict=False)
    torch.testing.assert_close(ep.module()(x), model(x))


def test_corpus_and_batches() -> None:
    data = load_corpus(max_bytes=50_000)
    assert data.dtype == torch.long and data.ndim == 1 and len(data) == 50_000
    assert int(data.min()) >= 0 and int(data.max()) <= 255
    train, val = train_val_split(data, val_fraction=0.1)
    assert len(train) == 45_000 and len(val) == 5_000
    x1, y1 = get_batch(train, 4, 32, torch.Generator().manual_seed(1))
    x2, y2 = get_batch(train, 4, 32, torch.Generator().manual_seed(1))
    assert x1.shape == y1.shape == (4, 32)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    torch.testing.assert_close(x1[:, 1:], y1[:, :-1])
    x3, _ = get_batch(train, 4, 32, torch.Generator().manual_seed(2))
    assert not torch.equal(x1, x3)
