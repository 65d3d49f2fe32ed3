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
    with pytest.raises(AdapterError, match="wraps it. A wrapper module of your own"):
        attn.q_proj = nn.Sequential(attn.q_proj)  # a wrapper of one's own, after transform
    transformed.value_head = nn.Linear(64, 1)  # a head your own code calls on the root
    del transformed.value_head


def _lora_model(seed: int = 0, b_std: float = 0.0) -> peft.PeftModel:
    model = peft.get_peft_model(hf_llama(seed=seed), _lora())
    if b_std:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, b_std, generator=torch.Generator().manual_seed(2))
    return model


@pytest.mark.parametrize("which", ["peft_model", "inner_without_pretrained"])
def test_unsupported_ways_to_transform_adapters_are_errors_and_touch_no_weight(which: str) -> None:
    model = _lora_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    target = model if which == "peft_model" else model.base_model.model
    ids = _ids()
    with pytest.raises(AdapterError, match="pretrained=True") as err:
        umup_fx.transform(target, (ids,), {"labels": ids})
    assert "base_model.model" in str(err.value)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert not umup_fx.runtime.modules.is_transformed(model.base_model.model)


def test_lora_on_embeddings_is_refused() -> None:
    model = peft.get_peft_model(hf_llama(), peft.LoraConfig(r=4, target_modules=["embed_tokens"]))
    ids = _ids()
    with pytest.raises(AdapterError, match="only LoRA on nn.Linear"):
        umup_fx.transform(model.base_model.model, (ids,), {"labels": ids}, pretrained=True)


def _logits(model: nn.Module) -> torch.Tensor:
    """Called as at transform (ids and labels): a new call structure would be captured again."""
    ids = _ids()
    with torch.no_grad():
        return model(ids, labels=ids).logits


def test_a_zero_adapter_leaves_the_transformed_model_as_the_base() -> None:
    ids = _ids()
    base = umup_fx.transform(hf_llama(), (ids,), {"labels": ids}, pretrained=True)
    lora = _lora_model().base_model.model
    umup_fx.transform(lora, (ids,), {"labels": ids}, pretrained=True)
    torch.testing.assert_close(_logits(lora), _logits(base), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def lora_run() -> dict:
    """A LoRA model with a non-zero adapter, its logits before transform, then transformed."""
    model = _lora_model(b_std=0.05)
    inner = model.base_model.model
    want = _logits(inner)
    frozen = {n: p.detach().clone() for n, p in inner.named_parameters() if not p.requires_grad}
    ids = _ids()
    umup_fx.transform(inner, (ids,), {"labels": ids}, pretrained=True)
    return {"peft": model, "inner": inner, "want": want, "frozen": frozen}


def test_transformed_lora_model_computes_what_it_computed(lora_run) -> None:
    got = _logits(lora_run["inner"])
    torch.testing.assert_close(got, lora_run["want"], rtol=1e-2, atol=1e-2)  # export's fold
    adds = [n for gm in lora_run["inner"].region_graphs().values() for n in gm.graph.nodes
            if n.op == "call_function" and "adds_add" in str(n.target)]
    assert not adds  # the base + adapter sums stay plain sums (no unit-scaled add)


def test_lora_learning_rates_follow_width_and_rank(lora_run) -> None:
    params = lora_run["inner"].umup_plan.params
    prefix = "model.layers.0.self_attn.q_proj."
    base = params[prefix + "base_layer.weight"].lr_factor
    assert params[prefix + "lora_A.default.weight"].lr_factor == pytest.approx(base)  # fan-in d
    d, r = 64, 4
    assert params[prefix + "lora_B.default.weight"].lr_factor == pytest.approx(base * (d / r) ** 0.5)


def test_lora_trains_adapters_only_and_the_peft_wrapper_runs_it(lora_run) -> None:
    inner, model, ids = lora_run["inner"], lora_run["peft"], _ids()
    opt = umup_fx.AdamW(inner, lr=2**-4)
    named = dict(inner.named_parameters())
    grouped = {n for g in opt.param_groups for n in g["names"]}
    assert grouped and all("lora_" in n for n in grouped)
    for n, loaded in lora_run["frozen"].items():  # converted by one factor, not re-initialised
        p = named[n].detach()
        torch.testing.assert_close(p, loaded * (p.norm() / loaded.norm()), msg=n)
    before = {n: p.detach().clone() for n, p in named.items()}
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    for n in lora_run["frozen"]:
        assert torch.equal(named[n], before[n]), n  # frozen: never trained
    lora_before = {n: before[n] for n in named if "lora_" in n}
    assert any(not torch.equal(named[n], lora_before[n]) for n in lora_before if "lora_B" in n)


def test_merged_adapters_transform_as_a_plain_model() -> None:
    model = peft.get_peft_model(hf_llama(), _lora())
    merged = model.merge_and_unload()
    ids = _ids()
    umup_fx.transform(merged, (ids,), {"labels": ids})
    assert torch.isfinite(merged(ids, labels=ids).loss)


def test_the_adapter_add_is_recognised_through_dropout_and_in_the_mlp() -> None:
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                             lora_dropout=0.1)
    inner = peft.get_peft_model(hf_llama(), config).base_model.model
    ids = _ids()
    umup_fx.transform(inner, (ids,), {"labels": ids}, pretrained=True)
    nodes = [n for gm in inner.region_graphs().values() for n in gm.graph.nodes]
    assert any("dropout" in str(n.target) for n in nodes)
    assert not [n for n in nodes if n.op == "call_function" and "adds_add" in str(n.target)]


def _trained_lora() -> tuple[peft.PeftModel, torch.Tensor]:
    """A transformed LoRA model whose adapters trained 2 steps, and its logits."""
    model = _lora_model(b_std=0.05)
    inner, ids = model.base_model.model, _ids()
    umup_fx.transform(inner, (ids,), {"labels": ids}, pretrained=True)
    opt = umup_fx.AdamW(inner, lr=2**-4)
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    return model, _logits(model)


def _disable(model: peft.PeftModel) -> None:
    with model.disable_adapter():
        pass


@pytest.mark.parametrize("call", [
    lambda m: m.merge_and_unload(), lambda m: m.merge_adapter(), lambda m: m.unload(),
    _disable, lambda m: m.base_model.disable_adapter_layers(),
], ids=["merge_and_unload", "merge_adapter", "unload", "disable_adapter", "disable_layers"])
def test_merging_unloading_or_disabling_adapters_is_refused_before_anything_changes(call) -> None:
    model, want = _trained_lora()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(AdapterError, match=r"Nothing was changed.*umup_fx.export\(peft_model\)"):
        call(model)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert torch.equal(_logits(model), want)  # today merge_and_unload merged layer 0 first


def test_export_then_merge_is_the_merged_plain_model() -> None:
    model, want = _trained_lora()
    exported = umup_fx.export(model)
    assert isinstance(exported, peft.PeftModel) and exported is not model
    assert type(exported.base_model.model) is type(hf_llama())  # plain class, LoRA layers in it
    torch.testing.assert_close(_logits(exported), want, rtol=1e-5, atol=1e-5)
    merged = exported.merge_and_unload()
    assert type(merged) is type(hf_llama()) and not any("lora" in n for n, _ in merged.state_dict().items())
    torch.testing.assert_close(_logits(merged), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(_logits(model), want)  # the transformed model goes on as it was


def test_exported_adapters_save_and_load_onto_the_plain_base(tmp_path) -> None:
    model, want = _trained_lora()
    umup_fx.export(model).save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(hf_llama(), tmp_path)  # the pretrained base
    torch.testing.assert_close(_logits(loaded), want, rtol=1e-4, atol=1e-4)


def test_switching_to_an_adapter_the_graphs_do_not_run_is_refused() -> None:
    model = peft.get_peft_model(hf_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    model.add_adapter("other", peft.LoraConfig(r=4, target_modules=["q_proj"]))
    ids = _ids()
    umup_fx.transform(model.base_model.model, (ids,), {"labels": ids}, pretrained=True)
    want = _logits(model)
    model.set_adapter("default")  # the adapter the graphs run: allowed
    with pytest.raises(AdapterError, match="switch the active adapters to .'other'.*No layer"):
        model.set_adapter("other")
    model.set_adapter("default")
    assert model.active_adapters == ["default"] and torch.equal(_logits(model), want)
