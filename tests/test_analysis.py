"""Analysis on models whose every role, fan, depth and FP8 flag we know by hand."""

from __future__ import annotations

import pytest
import torch

import umup_fx
from umup_fx import AnalysisError, CaptureError

from .tiny_models import DataDependent, ElementwiseWeight, FusedQKVGPT, NoParams


@pytest.fixture(scope="module")
def gpt_plan() -> umup_fx.Plan:
    torch.manual_seed(0)
    return umup_fx.analyze(FusedQKVGPT(), (torch.randint(0, 96, (2, 16)),))


def test_fused_qkv_gpt_roles(gpt_plan: umup_fx.Plan) -> None:
    p = gpt_plan.params
    assert p["wte.weight"].role == "input"  # tied: first use is the embedding
    assert [u.role for u in p["wte.weight"].uses] == ["input", "output"]
    assert p["wte.weight"].aliases == ("wte.weight", "lm_head.weight")
    assert p["wpe.weight"].role == "input"
    for i in range(2):
        b = f"blocks.{i}."
        assert p[b + "c_attn.weight"].role == "hidden"
        assert p[b + "c_attn.bias"].role == "bias"
        assert p[b + "ln_1.weight"].role == "norm"
        assert p[b + "ln_1.bias"].role == "norm"
        assert p[b + "c_fc.weight"].role == "hidden"
        assert p[b + "c_out.weight"].role == "hidden"


def test_fused_qkv_gpt_fans(gpt_plan: umup_fx.Plan) -> None:
    p = gpt_plan.params
    qkv = p["blocks.0.c_attn.weight"]
    assert (qkv.fan_in_value, qkv.fan_out_value) == (32, 96)
    # The fused output is three times the attention width, symbolically.
    assert qkv.fan_out == 3 * p["blocks.0.c_proj.weight"].fan_in
    assert str(qkv.fan_in) == "d_model"
    assert (p["blocks.0.c_out.weight"].fan_in_value, p["blocks.0.c_out.weight"].fan_out_value) == (128, 32)
    emb = p["wte.weight"]
    assert (emb.fan_in_value, emb.fan_out_value) == (96, 32)


def test_fused_qkv_gpt_residuals_and_fp8(gpt_plan: umup_fx.Plan) -> None:
    assert gpt_plan.depth == 2
    assert [b.kind for b in gpt_plan.branches] == ["attention", "mlp"] * 2
    assert [round(b.tau, 6) for b in gpt_plan.branches] == [round((2 + i) ** -0.5, 6) for i in range(4)]
    p = gpt_plan.params
    assert p["blocks.0.c_attn.weight"].fp8 and p["blocks.1.c_fc.weight"].fp8
    assert not p["blocks.0.c_proj.weight"].fp8 and not p["blocks.0.c_out.weight"].fp8
    assert not p["wte.weight"].fp8
    assert p["blocks.0.c_attn.weight"].depth_scaled and not p["wte.weight"].depth_scaled
    assert not p["ln_f.weight"].depth_scaled
    # Hand-written attention is recognised, so softmax is not "uncovered".
    assert not any("softmax" in op for _, op, _ in gpt_plan.uncovered)


def test_lr_factors_follow_rules(gpt_plan: umup_fx.Plan) -> None:
    p, depth = gpt_plan.params, gpt_plan.depth
    assert p["wte.weight"].lr_factor == pytest.approx(32**-0.5)
    assert p["blocks.0.c_out.weight"].lr_factor == pytest.approx(128**-0.5 * depth**-0.5)
    assert p["blocks.0.c_attn.bias"].lr_factor == pytest.approx(depth**-0.5)
    assert p["ln_f.weight"].lr_factor == 1.0


def test_report_lists_everything(gpt_plan: umup_fx.Plan) -> None:
    text = str(gpt_plan)
    assert umup_fx.explain(gpt_plan) == text
    for name in gpt_plan.params:
        assert name in text
    assert "residual branches" in text and "FP8 matmuls" in text


def test_analyze_does_not_modify_the_model() -> None:
    model = FusedQKVGPT()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    umup_fx.analyze(model, (torch.randint(0, 96, (2, 16)),))
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_untraceable_model_error_names_the_line() -> None:
    with pytest.raises(CaptureError) as err:
        umup_fx.analyze(DataDependent(), (torch.randn(2, 8),))
    msg = str(err.value)
    assert "tiny_models.py" in msg and "y.sum() > 0" in msg
    assert "Traceback" not in msg


def test_wrong_inputs_error() -> None:
    with pytest.raises(CaptureError, match="do not fit"):
        umup_fx.analyze(FusedQKVGPT(), (torch.randint(0, 96, (2, 16)), torch.zeros(1)))
    with pytest.raises(CaptureError, match="even without umup_fx"):
        umup_fx.analyze(FusedQKVGPT(), (torch.randn(2, 16, 5),))


def test_no_parameters_error() -> None:
    with pytest.raises(AnalysisError, match="no parameters"):
        umup_fx.analyze(NoParams(), (torch.randn(2, 8),))


def test_unclassifiable_parameter_error_and_override() -> None:
    with pytest.raises(AnalysisError, match=r"'mix'.*roles="):
        umup_fx.analyze(ElementwiseWeight(), (torch.randn(4, 8),))
    plan = umup_fx.analyze(ElementwiseWeight(), (torch.randn(4, 8),), roles={"mix": "fixed"})
    assert plan.params["mix"].role == "fixed"
