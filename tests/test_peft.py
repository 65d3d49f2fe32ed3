"""LoRA / PEFT and a transformed model (umup_fx/runtime/adapters.py): refused both ways
with AdapterError, before anything is changed; wrappers and new heads still allowed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import umup_fx
from tests.tiny_models import hf_llama
from umup_fx.errors import AdapterError

peft = pytest.importorskip("peft")


def _ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))


def _lora() -> peft.LoraConfig:
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)


@pytest.fixture(scope="module")
def transformed() -> nn.Module:
    ids = _ids()
    return umup_fx.transform(hf_llama(), (ids,), {"labels": ids})


def test_adapters_added_after_transform_are_an_error_and_change_nothing(transformed) -> None:
    ids = _ids()
    loss = transformed(ids, labels=ids).loss.item()
    with pytest.raises(AdapterError, match=r"replaced by a peft\..*never be called.*docs/training.md"):
        peft.get_peft_model(transformed, _lora())
    assert not any("lora" in n for n, _ in transformed.named_parameters())
    assert transformed(ids, labels=ids).loss.item() == loss


def test_any_replaced_module_is_an_error_but_wrappers_and_root_heads_are_not(transformed) -> None:
    attn = transformed.model.layers[0].self_attn
    with pytest.raises(AdapterError, match="'q_proj' was replaced by a torch.nn.modules.linear.Linear"):
        attn.q_proj = nn.Linear(64, 64, bias=False)
    with pytest.raises(AdapterError, match="new submodule 'adapter'"):
        attn.adapter = nn.Linear(64, 4)
    attn.q_proj = attn.q_proj  # the same module again
    transformed.value_head = nn.Linear(64, 1)  # a head your own code calls on the root
    del transformed.value_head


def _frozen_lora_model() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    model = peft.get_peft_model(hf_llama(), _lora())
    return model, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("which", ["peft_model", "inner_model"])
def test_transform_of_a_model_with_adapters_is_an_error_and_touches_no_weight(which: str) -> None:
    model, before = _frozen_lora_model()
    target = model if which == "peft_model" else model.base_model.model
    ids = _ids()
    with pytest.raises(AdapterError, match="PEFT adapter layer|PeftModel") as err:
        umup_fx.transform(target, (ids,), {"labels": ids})
    assert "merge_and_unload" in str(err.value)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert not umup_fx.runtime.modules.is_transformed(model.base_model.model)


def test_merged_adapters_transform_as_a_plain_model() -> None:
    model = peft.get_peft_model(hf_llama(), _lora())
    merged = model.merge_and_unload()
    ids = _ids()
    umup_fx.transform(merged, (ids,), {"labels": ids})
    assert torch.isfinite(merged(ids, labels=ids).loss)
