"""A call structure first seen after transform keeps the transform's reference sizes
(rules §3, "Reference sizes"), and a deep-copied model keeps its call structures."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

import umup_fx
from examples.llama import Llama, LlamaConfig
from umup_fx.runtime.modules import graphs_of


def _model() -> tuple[Llama, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = Llama(LlamaConfig(d_model=64, n_layers=2, n_heads=4))
    x, y = torch.randint(0, 256, (8, 32)), torch.randint(0, 256, (8, 32))
    umup_fx.transform(model, (x, y))
    return model, x, y


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def test_new_call_structure_at_another_size_has_the_transforms_gradients() -> None:
    model, _, _ = _model()
    x, y = torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16))
    model(x, y).backward()  # the transform's structure, at a smaller batch
    want = _grads(model)
    logits = model(x)  # first call without targets: captured now, on this [2, 16] call
    assert len(graphs_of(model)) == 2
    F.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()
    got = _grads(model)
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_deep_copy_keeps_call_structures_and_gradients() -> None:
    model, x, y = _model()
    twin = copy.deepcopy(model)
    model(x[:4], y[:4]).backward()
    twin(x[:4], y[:4]).backward()
    assert len(graphs_of(twin)) == 1  # no new capture: the copy knows its call
    want, got = _grads(model), _grads(twin)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)
