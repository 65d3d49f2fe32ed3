"""Weight norm (rules.md "Weight norm"): ``W = g * v / ||v||`` on convs and linears.

``v`` is the weight (the op's role and fans, unit init), ``g`` a gain at its unit value 1
(frozen by default), and the normed weight is made unit scale (``sqrt(n)`` for a norm
over ``n`` elements). Checked against PyTorch's own weight norm and the unit bands of
``umup_fx.check``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

import umup_fx
from umup_fx.runtime import ops

C, L, B = 32, 24, 4
V0 = "conv.parametrizations.weight.original1"  # v of the dim=0 conv
G0 = "conv.parametrizations.weight.original0"  # g of the dim=0 conv
V2 = "taps.parametrizations.weight.original1"  # v of the dim=2 conv (Wav2Vec2's form)
G2 = "taps.parametrizations.weight.original0"


class WeightNormNet(nn.Module):
    """A conv net with two weight-normed convs: one norm per output channel (dim=0,
    the default) and one per kernel tap (dim=2, Wav2Vec2's positional conv)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv1d(3, C, 3, padding=1)
        self.conv = parametrizations.weight_norm(nn.Conv1d(C, C, 5, padding=2))
        self.taps = parametrizations.weight_norm(nn.Conv1d(C, C, 4, padding=2, groups=4), dim=2)
        self.head = nn.Linear(C, 10)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(self.stem(x)))
        h = torch.relu(self.taps(h))[..., :L]
        return F.cross_entropy(self.head(h.mean(-1)), labels)


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, 3, L, generator=g), torch.randint(0, 10, (B,), generator=g)


def _transformed(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return umup_fx.transform(WeightNormNet(), _inputs(), check=False, **kwargs)


def _targets(model: nn.Module) -> list:
    return [n.target for gm in model.region_graphs().values() for n in gm.graph.nodes]


def test_graph_before_and_after() -> None:
    model = _transformed()
    before = [n.target for n in model.original_graph.graph.nodes]
    assert before.count(torch.ops.aten._weight_norm.default) == 2
    after = _targets(model)
    assert torch.ops.aten._weight_norm.default not in after
    assert after.count(ops.weight_norm) == 2
    calls = {n.args[0].name: n for gm in model.region_graphs().values() for n in gm.graph.nodes
             if n.target is ops.weight_norm}
    # n: the elements each norm runs over; one output row (C * 5), one kernel tap (C * C/4)
    assert sorted(c.kwargs["n"] for c in calls.values()) == [C * 5, C * C // 4]
    assert all(c.args[1] is None for c in calls.values())  # the gain out of the graph (§2)
    assert after.count(ops.conv) == 3
    assert model.umup_plan.uncovered == []


def test_roles_init_and_gain() -> None:
    model = _transformed()
    plan = model.umup_plan.params
    params = dict(model.named_parameters())
    for v, fan_in in ((V0, C * 5), (V2, C // 4 * 4)):
        assert (plan[v].role, plan[v].init, plan[v].fan_in_value) == ("hidden", "normal", fan_in)
        assert float(params[v].detach().pow(2).mean().sqrt()) == pytest.approx(1, rel=0.1)
    for g in (G0, G2):
        assert (plan[g].role, plan[g].trainable) == ("norm", False)
        assert not params[g].requires_grad and bool((params[g] == 1).all())


def test_weight_is_pytorchs_weight_norm_at_unit_scale() -> None:
    """The transformed model is PyTorch's own computation with the normed weight times
    sqrt(n) and the conv's fan_in^-1/2: compared with F.conv1d on the module's weights."""
    model = _transformed()
    x, labels = _inputs()
    conv = model.conv  # its parametrization still computes g * v / ||v|| when read
    w = conv.weight.detach()
    assert float(w[0].norm()) == pytest.approx(1, rel=1e-5)  # g = 1: unit rows before sqrt(n)
    unit_w = w * (C * 5) ** 0.5
    assert float(unit_w.pow(2).mean().sqrt()) == pytest.approx(1, rel=1e-5)
    stem = F.conv1d(x, model.stem.weight * (3 * 3) ** -0.5, model.stem.bias, padding=1)
    expected = F.conv1d(stem, unit_w * (C * 5) ** -0.5, conv.bias, padding=2)
    # the whole model against the same hand computation of every layer; ReLU x its unit
    # scale 1 / std(relu(X)) (rules §3, "Other activations")
    relu = ops.activation_scale("relu")
    taps = model.taps
    wt = taps.weight.detach() * (C * C // 4) ** 0.5
    h = F.conv1d(torch.relu(expected) * relu, wt * (C // 4 * 4) ** -0.5, taps.bias, padding=2, groups=4)
    # the mean over positions keeps scale; the head is a readout: alpha_out / fan_in (§3)
    logits = F.linear((torch.relu(h) * relu)[..., :L].mean(-1), model.head.weight / C,
                      model.head.bias / C)
    torch.testing.assert_close(model(x, labels), F.cross_entropy(logits, labels))


def test_unit_scale_at_init() -> None:
    model = _transformed()
    report = umup_fx.check(model, _inputs())
    assert report.ok, report.lines()
    by_weight = {op.weight: op for op in report.ops if op.weight}
    for v in (V0, V2):
        op = by_weight[v]
        assert 0.5 < op.out_rms < 2, op
        assert 0.2 < op.weight_grad_rms < 5, op


def test_trainable_gain_gradient_is_unit() -> None:
    """With trainable_norms the gain trains from 1; its gradient, a sum over n elements,
    comes out O(1) with the n^-1/2 scale (it would be about sqrt(n) = 12.6 without)."""
    model = _transformed(trainable_norms=True)
    params = dict(model.named_parameters())
    assert params[G0].requires_grad and ops.weight_norm in _targets(model)
    assert all(n.args[1] is not None for gm in model.region_graphs().values()
               for n in gm.graph.nodes if n.target is ops.weight_norm)
    model(*_inputs()).backward()
    v_grad = float(params[V0].grad.pow(2).mean().sqrt())
    g_grad = float(params[G0].grad.pow(2).mean().sqrt())
    g2_grad = float(params[G2].grad.pow(2).mean().sqrt())
    assert 0.2 < v_grad < 5 and 0.2 < g_grad < 5 and 0.2 < g2_grad < 5, (v_grad, g_grad, g2_grad)


def test_hook_weight_norm_on_a_linear() -> None:
    """The older ``torch.nn.utils.weight_norm`` (a forward pre-hook writing ``weight``)
    captures as the same op: ``weight_v`` is the linear's hidden weight, ``weight_g`` a gain."""
    torch.manual_seed(0)
    with pytest.warns(FutureWarning):
        mid = nn.utils.weight_norm(nn.Linear(C, C))
    net = nn.Sequential(nn.Linear(8, C), mid, nn.ReLU(), nn.Linear(C, C))
    x = torch.randn(B, L, 8, generator=torch.Generator().manual_seed(0))
    model = umup_fx.transform(net, (x,), check=False)
    plan = model.umup_plan.params
    assert (plan["1.weight_v"].role, plan["1.weight_g"].role) == ("hidden", "norm")
    assert ops.weight_norm in _targets(model)
    report = umup_fx.check(model, (x,))
    assert report.ok, report.lines()



def test_compile_backend_keeps_the_gain_out() -> None:
    """The umup backend runs the same passes: v at unit init, and the gain, out of the
    graph, gets no gradient (a plain optimizer leaves it at 1)."""
    torch.manual_seed(0)
    net = WeightNormNet()
    torch.compile(net, backend="umup", options={"inner": "eager"})(*_inputs()).backward()
    v, g = dict(net.named_parameters())[V2], dict(net.named_parameters())[G2]
    assert float(v.detach().pow(2).mean().sqrt()) == pytest.approx(1, rel=0.1)
    assert v.grad is not None and g.grad is None and bool((g == 1).all())


@pytest.mark.parametrize("trainable", [False, True], ids=["frozen_g", "trainable_g"])
def test_export_folds_into_g_and_import_divides_it(trainable: bool) -> None:
    """Export: the plain class (weight norm kept) computes what the trained transformed
    model computes, the factors in g and v copied as it is. Import of a checkpoint:
    the original's function, and its export gives the checkpoint back."""
    x, y = _inputs()
    model = _transformed(trainable_norms=trainable)
    opt = umup_fx.AdamW(model, lr=0.05)
    for _ in range(3):
        model(x, y).backward()
        opt.step()
        opt.zero_grad()
    plain = umup_fx.export(model)
    assert type(plain) is WeightNormNet and hasattr(plain.taps, "parametrizations")
    torch.testing.assert_close(plain(x, y), model(x, y), rtol=1e-5, atol=0)
    assert torch.equal(dict(plain.named_parameters())[V2], dict(model.named_parameters())[V2])

    torch.manual_seed(1)
    original = WeightNormNet()
    imported = umup_fx.transform(copy.deepcopy(original), (x, y), pretrained=True,
                                 trainable_norms=True, check=False)
    torch.testing.assert_close(imported(x, y), original(x, y), rtol=1e-5, atol=0)
    back = dict(umup_fx.export(imported).named_parameters())
    for name, p in original.named_parameters():
        torch.testing.assert_close(back[name], p, rtol=1e-5, atol=1e-7)
