"""Analysis on the example Llama (two widths), the MLP, and small HF models."""

from __future__ import annotations

import pytest
import torch

import umup_fx
from examples.llama import Llama, LlamaConfig
from examples.mlp import MLPClassifier
from tests.tiny_models import graph_nodes


def _llama_plan(d_model: int) -> umup_fx.Plan:
    torch.manual_seed(0)
    model = Llama(LlamaConfig(d_model=d_model, n_layers=2, n_heads=4))
    idx = torch.randint(0, 256, (2, 16))
    return umup_fx.analyze(model, (idx, idx))


@pytest.fixture(scope="module")
def llama_plans() -> tuple[umup_fx.Plan, umup_fx.Plan]:
    return _llama_plan(64), _llama_plan(128)


def test_llama_roles_fans_fp8(llama_plans) -> None:
    for plan, d in zip(llama_plans, (64, 128), strict=True):
        p = plan.params
        assert plan.depth == 2 and [b.kind for b in plan.branches] == ["attention", "mlp"] * 2
        assert p["embed.weight"].role == "input" and p["embed.weight"].fan_out_value == d
        assert p["lm_head.weight"].role == "output" and p["lm_head.weight"].fan_in_value == d
        for i in range(2):
            a, m = f"layers.{i}.attn.", f"layers.{i}.mlp."
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                assert p[a + name + ".weight"].role == "hidden"
                assert p[a + name + ".weight"].depth_scaled
            assert all(p[a + n + ".weight"].fp8 for n in ("q_proj", "k_proj", "v_proj"))
            assert p[m + "gate_proj.weight"].fp8 and p[m + "up_proj.weight"].fp8
            assert not p[a + "o_proj.weight"].fp8 and not p[m + "down_proj.weight"].fp8
            assert p[m + "down_proj.weight"].fan_in_value == p[m + "up_proj.weight"].fan_out_value
            assert p[f"layers.{i}.norm1.weight"].role == "norm"
        assert not p["embed.weight"].fp8 and not p["lm_head.weight"].fp8


def test_widening_changes_numbers_not_expressions(llama_plans) -> None:
    small, large = llama_plans
    for name, ps in small.params.items():
        pl = large.params[name]
        assert str(ps.fan_in) == str(pl.fan_in) and str(ps.fan_out) == str(pl.fan_out)
    q = "layers.0.attn.q_proj.weight"
    assert str(small.params[q].fan_in) == "d_model"
    assert (small.params[q].fan_in_value, large.params[q].fan_in_value) == (64, 128)


def test_mlp_roles() -> None:
    torch.manual_seed(0)
    plan = umup_fx.analyze(MLPClassifier(in_features=32, hidden=128, n_classes=10, depth=3),
                           (torch.randn(8, 32),))
    roles = {n: p.role for n, p in plan.params.items() if n.endswith("weight")}
    assert list(roles.values()) == ["input", "hidden", "output"]
    assert plan.depth == 0 and not plan.branches


def test_hf_llama() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, use_cache=False,
    )
    model = transformers.LlamaForCausalLM(cfg)
    idx = torch.randint(0, 128, (2, 16))
    plan = umup_fx.analyze(model, (idx,), {"labels": idx, "use_cache": False})
    p = plan.params
    assert plan.depth == 2 and [b.kind for b in plan.branches] == ["attention", "mlp"] * 2
    assert p["model.embed_tokens.weight"].role == "input"
    assert p["lm_head.weight"].role == "output"
    k = p["model.layers.0.self_attn.k_proj.weight"]
    assert k.role == "hidden" and (k.fan_in_value, k.fan_out_value) == (64, 32) and k.fp8
    assert not p["model.layers.1.self_attn.o_proj.weight"].fp8
    assert p["model.layers.1.mlp.gate_proj.weight"].fp8
    assert p["model.norm.weight"].role == "norm" and not p["model.norm.weight"].depth_scaled


def test_hf_gpt2_conv1d_layout() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                  use_cache=False)
    model = transformers.GPT2LMHeadModel(cfg)
    idx = torch.randint(0, 128, (2, 16))
    plan = umup_fx.analyze(model, (idx,), {"use_cache": False})
    p = plan.params
    # Conv1D stores [in, out]: fans come from the op, not the layout.
    fc = p["transformer.h.0.mlp.c_fc.weight"]
    assert fc.shape == (64, 256) and (fc.fan_in_value, fc.fan_out_value) == (64, 256)
    assert fc.role == "hidden" and fc.fp8
    proj = p["transformer.h.0.mlp.c_proj.weight"]
    assert (proj.fan_in_value, proj.fan_out_value) == (256, 64) and not proj.fp8
    assert p["transformer.wte.weight"].role == "input"
    assert [u.role for u in p["transformer.wte.weight"].uses] == ["input", "output"]
    assert p["transformer.h.0.attn.c_attn.weight"].fan_out_value == 192
    assert plan.depth == 2


def test_hf_gpt2_hand_written_tanh_gelu_is_recognised() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                  use_cache=False)
    idx = torch.randint(0, 128, (2, 16))
    model = umup_fx.transform(transformers.GPT2LMHeadModel(cfg), (idx,), {"labels": idx})
    assert not model.umup_plan.uncovered  # gelu_new's pow / tanh / adds are one GELU
    gelus = [n for n in graph_nodes(model) if n.target is umup_fx.runtime.ops.gelu]
    assert len(gelus) == 2 and all(n.kwargs["approximate"] == "tanh" for n in gelus)
    assert not any("tanh" in str(n.target) for n in graph_nodes(model))
    # The same function as before the rewrite, up to the GELU rule's output scale.
    x = torch.randn(1000)
    ref = 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x.pow(3))))
    ours = umup_fx.runtime.ops.gelu(x, approximate="tanh")
    ratio = ours / ref.where(ref.abs() > 1e-3, torch.ones(()))
    assert ratio[ref.abs() > 1e-3].std() < 1e-3  # a constant factor: the rule's scale
