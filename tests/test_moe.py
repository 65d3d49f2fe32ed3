"""Mixture-of-experts (rules §10): grouped expert matmuls, routers, the top-k combine,
FP8 eligibility, real transformers MoEs end to end, and the per-expert loop's error."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from umup_fx.passes.moe import scale_moe_combines

import umup_fx
from examples.moe import EinsumMoE, GroupedMoE, MoELM
from tests import families
from umup_fx import meta, rules
from umup_fx.capture.trace import capture
from umup_fx.options import Options
from umup_fx.pipeline import plan_graph
from umup_fx.runtime import fp8, ops


def _planned(model: nn.Module, *inputs: torch.Tensor, **options):
    gm = capture(model, inputs, blocks=False).gm
    opts = Options.build(**options)
    plan = plan_graph(gm, opts)
    g = meta.graph_meta(gm)
    g[meta.PLAN], g[meta.OPTIONS] = plan, opts
    return gm, plan


def _rule_nodes(gm, rule: str) -> list:
    return [n for n in gm.graph.nodes if meta.get(n, meta.RULE) == rule]


class _Probe(nn.Module):
    """embedding -> norm -> MoE -> head, returning the MoE's output too (a width the head
    reads, so it stays width-like): the block as it sits in an LM."""

    def __init__(self, moe: nn.Module, d: int = 64) -> None:
        super().__init__()
        self.emb, self.norm, self.moe = nn.Embedding(128, d), nn.RMSNorm(d), moe
        self.head = nn.Linear(d, 128, bias=False)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.moe(self.norm(self.emb(ids)))
        return self.head(y), y


_IDS = torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(0))


def test_grouped_linear_is_per_expert_linear_with_unit_scales() -> None:
    """Against each expert's own F.linear on its rows: forward * fan_in^-1/2, x's grad
    tied, W's grad * (rows per expert)^-1/2."""
    torch.manual_seed(0)
    experts, d_in, d_out, counts = 3, 8, 12, [5, 0, 7]
    x = torch.randn(sum(counts), d_in, requires_grad=True)
    w = torch.randn(experts, d_out, d_in, requires_grad=True)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    s = d_in**-0.5
    y = ops.grouped_linear("aten::_grouped_mm", x, w.transpose(-2, -1), offs,
                           out_scale=s, grad_input_scale=s)
    g = torch.randn_like(y)
    y.backward(g)
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    rows = torch.arange(sum(counts)).split(counts)
    ref = torch.cat([F.linear(xr[r], wr[e]) for e, r in enumerate(rows)]) * s
    ref.backward(g)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(x.grad, xr.grad)  # tied: the forward scale, once
    per_expert = sum(counts) / experts
    torch.testing.assert_close(w.grad, wr.grad / s * per_expert**-0.5)


def test_routing_graph_before_and_after() -> None:
    """passes.moe on a renormalised top-2 of 4: router softmax kept, combine * sqrt(2),
    the index_add back to tokens a pattern part; roles and fans per expert."""
    model = _Probe(GroupedMoE(64, hidden=32, experts=4, k=2)).to(torch.bfloat16)
    gm, plan = _planned(model, _IDS)
    # The router's softmax is kept, and so is all it alone computes (indices, loads).
    router_ops = {n.target for n in _rule_nodes(gm, rules.ROUTER)}
    assert torch.ops.aten.softmax.int in router_ops
    assert {torch.ops.aten.topk.default, torch.ops.aten.one_hot.default} <= router_ops
    (combine,) = _rule_nodes(gm, rules.MOE_COMBINE)
    info = meta.get(combine, meta.MOE)
    assert info["normalized"] and info["k"] == 2 and info["experts"] == 4
    assert info["scale"] == pytest.approx(math.sqrt(2))
    assert info["router"] == "moe.router.weight"
    accumulate = next(n for n in gm.graph.nodes if n.name == info["sum"])
    assert accumulate.target is torch.ops.aten.index_add.default
    assert meta.get(accumulate, meta.RULE) == rules.PATTERN_PART
    assert not plan.uncovered
    router, up, down = (plan.params[f"moe.{n}"] for n in ("router.weight", "w_up", "w_down"))
    assert router.role == rules.OUTPUT and router.fan_out_value == 4
    assert (up.role, up.fan_in_value, up.fan_out_value) == (rules.HIDDEN, 64, 32)
    assert (down.role, down.fan_in_value, down.fan_out_value) == (rules.HIDDEN, 32, 64)
    assert up.lr_factor == 64**-0.5 and down.lr_factor == 32**-0.5
    assert plan.symbols["experts"] == ("fixed", 4)
    # FP8 (§7): the experts' gate / up read the gathered norm output; down does not.
    assert up.fp8 and not down.fp8 and not router.fp8

    scale_moe_combines(gm)
    assert combine.target is ops.combine_experts
    assert combine.kwargs["scale"] == pytest.approx(math.sqrt(2))
    expert_out, gates = combine.args
    assert meta.get(expert_out, meta.GROUPED) and not meta.get(gates, meta.GROUPED)


def test_unnormalised_gates_scale_with_experts_over_sqrt_k() -> None:
    model = _Probe(GroupedMoE(64, experts=8, k=4, normalize=False)).to(torch.bfloat16)
    gm, _ = _planned(model, _IDS)
    (combine,) = _rule_nodes(gm, rules.MOE_COMBINE)
    info = meta.get(combine, meta.MOE)
    assert not info["normalized"] and info["gate_at_init"] == pytest.approx(1 / 8)
    assert info["scale"] == pytest.approx(8 / math.sqrt(4))


@pytest.mark.parametrize(("name", "build", "dtype"), [
    ("top-1", lambda: GroupedMoE(64, k=1), torch.bfloat16),
    ("top-2 renormalised", lambda: GroupedMoE(64, k=2), torch.bfloat16),
    ("top-4 of 8, softmax weights", lambda: GroupedMoE(64, experts=8, k=4, normalize=False),
     torch.bfloat16),
    ("shared expert", lambda: GroupedMoE(64, shared=True), torch.bfloat16),
    ("einsum dense dispatch", lambda: EinsumMoE(64), torch.float32),
])
def test_moe_block_output_is_unit_scale_at_init(name: str, build, dtype) -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = umup_fx.transform(_Probe(build()).to(dtype), (_IDS,))
    # The check expects each router's own gradient (rules §10): nothing is flagged, and
    # top-1 renormalised (its gate is always 1, no gradient reaches the router) is noted.
    assert not [w for w in caught if issubclass(w.category, umup_fx.ScaleWarning)], name
    assert ("no gradient reaches the router" in " ".join(model.umup_plan.notes)) == (name == "top-1")
    with torch.no_grad():
        y = model(_IDS)[1].float()
    assert 0.8 < float(y.pow(2).mean().sqrt()) < 1.25, name


@pytest.mark.parametrize("family", ["Mixtral (MoE)", "Qwen2-MoE", "OLMoE",
                                    "MoE, torch._grouped_mm (hand-written, bf16)",
                                    "MoE, einsum (hand-written)",
                                    "MoE, scattered gates (hand-written)"])
def test_moe_families_transform_at_unit_scale(family: str) -> None:
    """The issue's bar: no uncovered op, weight grads in [1/5, 5] (q/k lower), logits
    about fan_in^-1/2, a finite optimizer step."""
    result = families.check(family)
    assert result.status == "ok", result.message
    assert not result.uncovered
    assert result.unit_scale, result.low_grads()
    assert result.step_finite
    assert result.logits_rms == pytest.approx(result.readout_fan_in**-0.5, rel=0.2)


@pytest.mark.parametrize(("experts", "k", "normalize", "expected"), [
    (4, 2, True, (1 / 8) ** 0.5),  # sqrt((k - 1) / (k E))
    (8, 4, False, 8**-0.5),  # E^-1/2
])
def test_router_gradient_is_what_its_gates_give(experts, k, normalize, expected) -> None:
    """The router logits' gradient at init is the top-k gates' (rules §10), measured on
    the transformed block with a unit gradient at its output; check's band centres on it."""
    torch.manual_seed(0)
    model = umup_fx.transform(_Probe(GroupedMoE(64, experts=experts, k=k, normalize=normalize))
                              .to(torch.bfloat16), (_IDS,), check=False)
    report = umup_fx.check(model, (_IDS,))
    (router,) = [r for r in report.ops if r.weight == "moe.router.weight"]
    assert router.router_grad == pytest.approx(expected)
    assert 0.7 < router.grad_rms / expected < 1.4
    assert report.ok, report.lines()


def test_scattered_gates_and_dense_combine() -> None:
    """Top-k on the logits, a softmax over the k picked, scattered into a dense [.., E]
    gate and summed over E: the softmax is the router's (renormalised, g0 = 1/k), the
    product the combine (* sqrt(k)), the sum over E a pattern part; unit scale."""
    model = families.ScatterMoE(64, experts=4, k=2)
    gm, plan = _planned(model, torch.randn(2, 16, 64))
    (combine,) = _rule_nodes(gm, rules.MOE_COMBINE)
    info = meta.get(combine, meta.MOE)
    assert info["normalized"] and (info["k"], info["experts"]) == (2, 4)
    assert info["scale"] == pytest.approx(math.sqrt(2))
    summed = next(n for n in gm.graph.nodes if n.name == info["sum"])
    assert summed.target is torch.ops.aten.sum.dim_IntList
    assert meta.get(summed, meta.RULE) == rules.PATTERN_PART
    softmaxes = {torch.ops.aten._softmax.default, torch.ops.aten.softmax.int}
    assert any(n.target in softmaxes for n in _rule_nodes(gm, rules.ROUTER))
    assert not plan.uncovered  # (the family's numbers: test_moe_families_transform_...)


def test_transformers_router_and_experts_roles() -> None:
    pytest.importorskip("transformers")
    case = families.FAMILIES["Mixtral (MoE)"]()
    plan = umup_fx.analyze(case.model, case.args, case.kwargs)
    layer = "model.layers.0.mlp"
    assert plan.params[f"{layer}.gate.weight"].role == rules.OUTPUT
    gate_up = plan.params[f"{layer}.experts.gate_up_proj"]
    assert (gate_up.role, gate_up.fan_in_value, gate_up.fan_out_value) == (rules.HIDDEN, 64, 256)
    assert gate_up.fp8 and not plan.params[f"{layer}.experts.down_proj"].fp8


def test_fp8_experts_match_the_unquantised_model_closely() -> None:
    torch.manual_seed(0)
    base = MoELM(moe=lambda d: GroupedMoE(d), layers=1).to(torch.bfloat16)
    ids = families._ids()
    plain = umup_fx.transform(base, (ids,))
    torch.manual_seed(0)
    base8 = MoELM(moe=lambda d: GroupedMoE(d), layers=1).to(torch.bfloat16)
    quant = umup_fx.transform(base8, (ids,), fp8="simulate")
    quant.load_state_dict(plain.state_dict())
    graphs = "\n".join(g.code for g in quant.region_graphs().values())
    assert "fp8_grouped_linear" in graphs
    a, b = plain(ids).float().detach(), quant(ids).float()
    assert not torch.equal(a, b)  # the experts really ran in FP8
    assert float((a - b.detach()).pow(2).mean().sqrt() / a.pow(2).mean().sqrt()) < 0.1
    b.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in quant.parameters() if p.grad is not None)


def test_fp8_grouped_simulation_rounds_inputs_and_grads() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 16, requires_grad=True)
    w = torch.randn(2, 16, 8, requires_grad=True)
    offs = torch.tensor([3, 8], dtype=torch.int32)
    y = fp8.grouped_linear("aten::_grouped_mm", x, w, offs, out_scale=1.0, grad_input_scale=1.0,
                           mode="simulate")
    ref = torch._grouped_mm(fp8.round_trip(x.detach(), fp8.E4M3),
                            fp8.round_trip(w.detach(), fp8.E4M3), offs=offs)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y) * 1e-3  # below E5M2's normal range: rounding shows
    y.backward(g)
    g8 = fp8.round_trip(g, fp8.E5M2)
    expected = torch.cat([g8[:3] @ fp8.round_trip(w.detach()[0], fp8.E4M3).t(),
                          g8[3:] @ fp8.round_trip(w.detach()[1], fp8.E4M3).t()])
    torch.testing.assert_close(x.grad, expected)


@pytest.mark.parametrize(("implementation", "error"), [
    ("eager", umup_fx.CaptureError),  # a Python loop over the experts hit
    ("batched_mm", umup_fx.AnalysisError),  # expert weights gathered per token
])
def test_unsupported_expert_implementations_fail_with_the_fix(implementation, error) -> None:
    pytest.importorskip("transformers")
    build = families._hf("MixtralForCausalLM", "MixtralConfig", num_key_value_heads=2,
                         num_local_experts=4, num_experts_per_tok=2,
                         experts_implementation=implementation)
    case = build()
    with pytest.raises(error, match="experts_implementation=.grouped_mm"):
        umup_fx.transform(case.model, case.args, case.kwargs)


def test_load_balancing_loss_keeps_its_value() -> None:
    """Routing statistics are kept as written: the transformed Mixtral's aux loss equals
    transformers' own function applied to the router logits it returns."""
    pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    torch.manual_seed(0)
    build = families._hf("MixtralForCausalLM", "MixtralConfig", num_key_value_heads=2,
                         intermediate_size=128, num_local_experts=4, num_experts_per_tok=2,
                         output_router_logits=True)
    case = build()
    with pytest.warns(umup_fx.OneGraphWarning):  # the root reads the blocks' router logits
        model = umup_fx.transform(case.model, case.args, case.kwargs)
    assert not model.umup_plan.uncovered
    out = model(*case.args, **case.kwargs)
    expected = load_balancing_loss_func(out.router_logits, 4, 2)
    assert out.aux_loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_deepseek_gathered_sigmoid_gates() -> None:
    """DeepSeek-V3 picks experts on biased sigmoid scores and gathers the unbiased ones,
    renormalises and multiplies by routed_scaling_factor: g0 = factor / k."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.DeepseekV3Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
        num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
        first_k_dense_replace=0, q_lora_rank=None, kv_lora_rank=32, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=16, routed_scaling_factor=2.5, use_cache=False)
    ids = families._ids()
    gm, plan = _planned(transformers.DeepseekV3ForCausalLM(cfg), ids)
    (combine,) = _rule_nodes(gm, rules.MOE_COMBINE)
    info = meta.get(combine, meta.MOE)
    assert info["normalized"] and info["gate_at_init"] == pytest.approx(2.5 / 2)
    assert info["scale"] == pytest.approx(1 / (1.25 * math.sqrt(2)))
    assert plan.params["model.layers.0.mlp.gate.weight"].role == rules.OUTPUT
