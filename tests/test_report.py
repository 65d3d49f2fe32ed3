"""The report: unified width symbols, data dims apart, frozen norms, FP8 path, grouping."""

from __future__ import annotations

import pytest
import sympy as sp
import torch
from torch import nn

import umup_fx
from examples.llama import Llama, LlamaConfig
from examples.mlp import MLPClassifier
from umup_fx import UmupError, report

WIDTHS = {"d_model", "d_q_proj", "d_k_proj", "d_v_proj", "d_gate_proj"}


def _llama() -> Llama:
    torch.manual_seed(0)
    return Llama(LlamaConfig(d_model=64, n_layers=4, n_heads=4))


def _idx() -> torch.Tensor:
    return torch.randint(0, 256, (2, 64))


@pytest.fixture(scope="module")
def plan() -> umup_fx.Plan:
    return umup_fx.analyze(_llama(), (_idx(),))


@pytest.fixture(scope="module")
def fp8_model() -> Llama:
    return umup_fx.transform(_llama(), (_idx(),), fp8="simulate")


def _kinds(plan: umup_fx.Plan, kind: str) -> dict[str, int]:
    return {k: v for k, (kd, v) in plan.symbols.items() if kd == kind}


def _line(text: str, start: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(start))


def test_width_symbols_are_one_per_quantity(plan: umup_fx.Plan) -> None:
    assert _kinds(plan, "width") == {
        "d_model": 64, "d_q_proj": 64, "d_k_proj": 64, "d_v_proj": 64, "d_gate_proj": 192,
    }
    assert _kinds(plan, "fixed") == {"vocab": 256, "out": 256}
    assert _kinds(plan, "data") == {"batch": 2, "seq": 64}
    text = str(plan)
    assert "d_q_proj_2" not in text and "d_gate_proj_2" not in text
    assert _line(text, "width-like dims:") == (
        "width-like dims: d_model=64, d_q_proj=64, d_k_proj=64, d_v_proj=64, d_gate_proj=192"
    )


def test_fans_use_the_unified_names(plan: umup_fx.Plan) -> None:
    names = set(plan.symbols)
    for p in plan.params.values():
        for fan in (p.fan_in, p.fan_out):
            if fan is not None:
                assert {str(s) for s in fan.free_symbols} <= names, p.name
    for i in range(4):  # blocks 0-1 are captured, 2-3 copied by plan.expand_blocks
        a, m = plan.params, f"layers.{i}.mlp."
        assert a[f"layers.{i}.attn.q_proj.weight"].fan_out == sp.Symbol("d_q_proj", positive=True)
        assert str(a[f"layers.{i}.attn.o_proj.weight"].fan_in) == "d_v_proj"
        assert str(a[m + "up_proj.weight"].fan_out) == str(a[m + "down_proj.weight"].fan_in)
        assert str(a[m + "down_proj.weight"].fan_in) == "d_gate_proj"
        assert str(a[m + "down_proj.weight"].fan_out) == "d_model"


def test_batch_and_seq_are_data_dims_not_fixed(plan: umup_fx.Plan) -> None:
    text = str(plan)
    fixed = _line(text, "fixed dims:")
    assert fixed == "fixed dims: vocab=256, out=256"
    assert "batch=2" in _line(text, "data dims") and "seq=64" in _line(text, "data dims")


def test_rows_are_grouped_over_blocks_and_the_plan_keeps_each(plan: umup_fx.Plan) -> None:
    text = str(plan)
    for row in ("layers.{0..3}.attn.q_proj.weight", "layers.{0..3}.mlp.down_proj.weight",
                "layers.{0..3}.norm1.weight"):
        assert row in text
    assert "layers.2." not in text and "layers.0.attn" not in text
    assert len(text.splitlines()) <= 30
    assert len(plan.params) == 3 + 4 * 9 and len(plan.branches) == 8
    branches = text.split("residual branches (")[1].splitlines()
    assert any(line.startswith("attention  4") and "layers.{0..3}" in line for line in branches)
    assert any(line.startswith("mlp        4") for line in branches)


def test_norm_lr_shown_unless_frozen(plan: umup_fx.Plan, fp8_model: Llama) -> None:
    for text in (str(plan), str(fp8_model.umup_plan)):  # analyze and transform agree
        for name in ("layers.{0..3}.norm1.weight", "layers.{0..3}.norm2.weight", "norm.weight"):
            row = _line(text, name)
            assert "frozen" in row and "eta" not in row
    assert not fp8_model.umup_plan.params["layers.3.norm2.weight"].trainable
    assert not plan.params["layers.3.norm2.weight"].trainable
    trainable = umup_fx.analyze(_llama(), (_idx(),), trainable_norms=True)
    assert "eta/sqrt(L)" in _line(str(trainable), "layers.{0..3}.norm1.weight")


def test_analyze_and_transform_print_one_report() -> None:
    """The same dims, names, roles and LRs whether or not targets are passed, and the
    report says what eta is and the rate of each optimizer group."""
    x, y = _idx(), torch.randint(0, 256, (2, 64))
    analysed = str(umup_fx.analyze(_llama(), (x,)))
    transformed = str(umup_fx.transform(_llama(), (x, y)).umup_plan)
    assert "targets_seq=64" in transformed and "batch_2" not in transformed
    drop = ("data dims",)  # the targets' length is the one extra data dim
    assert [t for t in analysed.splitlines() if not t.startswith(drop)] == [
        t for t in transformed.splitlines() if not t.startswith(drop)]
    assert "umup_fx.AdamW's default 2^0 = 1" in analysed
    # q/k/v/o, gate and up at 1/sqrt(64)/sqrt(4); down at 1/sqrt(192)/sqrt(4); 1 for the rest
    assert "0.0625 (24 params)" in analysed and "0.03608 (4 params)" in analysed


def test_position_table_and_vocabulary_are_named_apart() -> None:
    from examples.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    plan = umup_fx.analyze(GPT(GPTConfig(n_embd=32, n_layer=2, n_head=2)), (_idx(),))
    assert _kinds(plan, "fixed") == {"positions": 128, "vocab": 256}


def test_fp8_path_is_named(plan: umup_fx.Plan, fp8_model: Llama) -> None:
    text = str(fp8_model.umup_plan)
    assert "FP8 matmuls: 20 linears in FP8" in text
    assert "path simulate: cast to FP8 and back" in text
    assert "off (transform with fp8=True to use)" in str(plan)
    auto = report._fp8_path("auto")
    if torch.cuda.is_available() and umup_fx.runtime.fp8.has_fp8_matmul(torch.device("cuda")):
        assert "real torch._scaled_mm on this machine" in auto
    else:
        assert auto.startswith("path auto -> simulated on this machine")
    assert "scaled_mm" in report._fp8_path("scaled_mm")


def test_index_sets() -> None:
    assert report._index_set([0, 1, 2, 3]) == "{0..3}"
    assert report._index_set([0, 2, 4]) == "{0,2,4}"
    assert report._index_set([0, 1, 2, 5, 7, 8, 9]) == "{0..2,5,7..9}"


class _Stack(nn.Module):
    """Residual MLP blocks whose hidden widths are 32, 32, 48: two quantities, not one."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(16, h), nn.GELU(), nn.Linear(h, 16)) for h in (32, 32, 48)
        )
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for b in self.blocks:
            x = x + b(x)
        return self.out(x)


def test_only_equal_values_in_the_same_place_are_unified() -> None:
    plan = umup_fx.analyze(_Stack(), (torch.randn(4, 8),))
    widths = _kinds(plan, "width")
    assert sorted(widths.values()) == [16, 32, 48]
    p = plan.params
    assert str(p["blocks.0.0.weight"].fan_out) == str(p["blocks.1.0.weight"].fan_out)
    assert str(p["blocks.0.0.weight"].fan_out) != str(p["blocks.2.0.weight"].fan_out)
    assert widths == {"d_model": 16, "d_blocks": 32, "d_blocks_2": 48}
    assert _kinds(plan, "fixed") == {"out": 4, "x_dim": 8}
    assert _kinds(plan, "data") == {"batch": 4}


def test_mlp_hidden_layers_share_one_width() -> None:
    torch.manual_seed(0)
    plan = umup_fx.analyze(MLPClassifier(in_features=32, hidden=128, n_classes=10, depth=3),
                           (torch.randn(8, 32),))
    assert _kinds(plan, "width") == {"d_model": 128}
    assert _kinds(plan, "data") == {"batch": 8}
    assert 8 not in _kinds(plan, "fixed").values()


def test_draw_needs_pydot_and_graphviz(fp8_model: Llama, tmp_path, monkeypatch) -> None:
    from torch.fx.passes import graph_drawer

    monkeypatch.setattr(graph_drawer, "HAS_PYDOT", False, raising=False)
    with pytest.raises(UmupError, match="pip install pydot"):
        report.draw(fp8_model.layers[0].graph_module, tmp_path / "block.svg")
