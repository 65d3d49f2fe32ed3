"""Per-channel scales and parameters no rule covers (rules.md, "Per-channel scales"):
LayerScale and a `1 + w` gain on any activation are gains, non-parametric under u-muP;
the error for an unknown use advises a role from how the parameter is used."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import umup_fx
from tests.tiny_models import graph_nodes

D = 64


class LayerScaleNet(nn.Module):
    """A pre-norm residual branch times a learned per-channel scale (CaiT / DINOv2)."""

    def __init__(self, plus_one: bool = False) -> None:
        super().__init__()
        self.inp, self.mid, self.out = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, 10)
        self.gamma = nn.Parameter(torch.zeros(D) if plus_one else 1e-5 * torch.ones(D))
        self.plus_one = plus_one

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        gain = self.gamma + 1 if self.plus_one else self.gamma
        return self.out(h + gain * self.mid(F.layer_norm(h, (D,))))


@pytest.mark.parametrize("plus_one", [False, True])
def test_per_channel_scale_is_a_frozen_gain(plus_one: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(256, D)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither uncovered nor off unit scale
        model = umup_fx.transform(LayerScaleNet(plus_one), (x,))
    p = model.umup_plan.params["gamma"]
    assert p.role == "norm" and not p.trainable
    assert torch.equal(model.gamma.detach(), torch.zeros(D) if plus_one else torch.ones(D))
    # after: the product stays in the graph, as the identity at init
    reads = [n for n in graph_nodes(model) if any("gamma" in a.name for a in n.all_input_nodes)]
    op = torch.ops.aten.add.Tensor if plus_one else torch.ops.aten.mul.Tensor
    assert [n.target for n in reads] == [op]
    report = umup_fx.check(model, (x,))
    assert report.ok, report.lines()
    # numbers: the branch reaches the stream at unit scale, not at the model's 1e-5
    mid = next(r for r in report.ops if r.weight == "mid.weight")
    assert 0.5 < mid.grad_rms < 2 and not model.umup_plan.uncovered


class Decay(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(D, D), nn.Linear(D, 10)
        self.A_log = nn.Parameter(torch.zeros(D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.inp(x) * torch.exp(-torch.exp(self.A_log)))


def test_advice_comes_from_the_use() -> None:
    x = torch.randn(32, D)
    with pytest.raises(umup_fx.AnalysisError, match=r"'A_log': 'unused'") as e:
        umup_fx.transform(Decay(), (x,))
    assert "'hidden'" not in str(e.value) and "aten.exp" in str(e.value)
    torch.manual_seed(0)
    model = umup_fx.transform(Decay(), (x,), roles={"A_log": "unused"})
    assert torch.equal(model.A_log.detach(), torch.zeros(D))  # the model's own init kept
    assert model.umup_plan.params["A_log"].lr_factor == 1.0


def test_advice_for_a_matrix_is_a_weight_role() -> None:
    from umup_fx.passes.roles import advice

    node = next(n for n in torch.fx.symbolic_trace(nn.Identity()).graph.nodes)
    assert "'hidden'" in advice("w", (64, 64), node)
    assert "'norm'" in advice("g", (1, 1, 64), node)
