"""Block discovery: the containers a forward iterates (ModuleList, ModuleDict as
torchtitan keeps its layers, Sequential) give blocks that run as modules of their own;
blocks held as plain attributes make the model one graph, with a warning saying why."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import umup_fx
from examples.llama import Block, Llama, LlamaConfig
from umup_fx.runtime.modules import UmupBlock

CFG = dict(vocab_size=64, d_model=32, n_layers=3, n_heads=2)


class DictLlama(Llama):
    """torchtitan's layout: ``self.layers = nn.ModuleDict`` iterated by ``.values()``."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__(config)
        self.layers = nn.ModuleDict({str(i): b for i, b in enumerate(self.layers)})

    def forward(self, idx, targets=None):
        x = self.embed(idx)
        for layer in self.layers.values():
            x = layer(x)
        logits = self.lm_head(self.norm(x))
        return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


class AttributeBlocks(Llama):
    """Two blocks kept as attributes (no container)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__(config)
        self.first, self.second = self.layers[0], self.layers[1]
        del self.layers

    def forward(self, idx, targets=None):
        logits = self.lm_head(self.norm(self.second(self.first(self.embed(idx)))))
        return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _ids() -> torch.Tensor:
    return torch.randint(0, CFG["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(1))


def _transformed(cls: type, **cfg) -> tuple[nn.Module, torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = cls(LlamaConfig(**{**CFG, **cfg}))
    x = _ids()
    torch.manual_seed(1)
    umup_fx.transform(model, (x, x), check=False)
    loss = model(x, x)
    loss.backward()
    return model, loss, {n: p.grad for n, p in model.named_parameters()}


def test_a_module_dict_of_layers_gives_blocks_that_compute_the_module_list_model() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", umup_fx.OneGraphWarning)
        model, loss, grads = _transformed(DictLlama)
    assert list(model.layers.keys()) == ["0", "1", "2"]
    assert all(isinstance(b, UmupBlock) for b in model.layers.values())
    assert all(isinstance(b, Block) for b in model.layers.values())  # class kept
    listed, loss_listed, grads_listed = _transformed(Llama)
    torch.testing.assert_close(loss, loss_listed)
    for name, grad in grads_listed.items():
        torch.testing.assert_close(grads[name], grad)
    assert model.state_dict().keys() == listed.state_dict().keys()


def test_blocks_held_as_attributes_warn_that_the_model_is_one_graph() -> None:
    with pytest.warns(umup_fx.OneGraphWarning, match=r"first, second look like blocks"):
        model, loss, _ = _transformed(AttributeBlocks, n_layers=2)
    assert not isinstance(model.first, UmupBlock)
    assert torch.isfinite(loss)


def test_a_model_without_repeated_blocks_does_not_warn() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error", umup_fx.OneGraphWarning)
        umup_fx.transform(model, (torch.randn(4, 8),), check=False)
