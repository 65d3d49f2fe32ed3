"""Three forms rules.md now rules on: a table read through a norm, grouped / depthwise
convolutions, learned queries expanded over the batch. Graph before / after, and the
numbers at init against the check's bands (rules §8)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import umup_fx
from tests.tiny_models import graph_nodes
from umup_fx.runtime import ops

D, V, S, B = 64, 64, 16, 4


def _ids() -> torch.Tensor:
    return torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(0))


def _weight_grads(model: nn.Module, loss: torch.Tensor) -> dict[str, float]:
    loss.backward()
    return {n: float(p.grad.pow(2).mean().sqrt()) for n, p in model.named_parameters()
            if p.grad is not None and p.dim() > 1}


# -- a table read through a norm (DeBERTa-v2's relative positions) -----------------------
class RelTableLM(nn.Module):
    """A relative-position table normalised, projected to keys, added as a logit bias."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.q = nn.Embedding(V, D), nn.Linear(D, D)
        self.rel, self.rel_norm = nn.Parameter(torch.randn(S, D) * 0.02), nn.LayerNorm(D)
        self.pos_key, self.v, self.head = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, V)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        rel = self.pos_key(self.rel_norm(self.rel))  # [S, D]: one key per offset
        att = torch.softmax(self.q(h) @ rel.T / D**0.5, -1)  # [B, S, S]
        return self.head(h + att @ self.v(h))


def test_table_through_a_norm_is_an_input_weight() -> None:
    torch.manual_seed(0)
    model = umup_fx.transform(RelTableLM(), (_ids(),))
    plan = model.umup_plan.params
    rel, gain = plan["rel"], plan["rel_norm.weight"]
    # before: the table is the norm's input (its gain is the other 1-D parameter)
    ln = next(n for n in model.original_graph.graph.nodes
              if n.op == "call_function" and n.target is torch.ops.aten.layer_norm.default)
    assert ln.args[0].name == "p_rel"
    # after: an input weight (unit init, trainable, eta/sqrt(d)); the norm keeps a gain
    # like any norm, frozen at 1 (non-parametric, rules §2)
    assert (rel.role, rel.init, rel.trainable, rel.fan_out_value) == ("input", "normal", True, D)
    assert rel.lr_factor == pytest.approx(D**-0.5)
    assert (gain.role, gain.init, gain.trainable) == ("norm", "ones", False)
    assert ops.layer_norm in [n.target for n in graph_nodes(model)]
    # the relative term is not zero at init (a table of ones through a norm would be)
    table = model.rel.detach()
    assert float(table.std()) == pytest.approx(1, rel=0.2)
    assert float(F.layer_norm(table, (D,)).pow(2).mean().sqrt()) == pytest.approx(1, rel=0.01)


def test_table_through_a_norm_numbers_at_init() -> None:
    torch.manual_seed(0)
    model = umup_fx.transform(RelTableLM(), (_ids(),), check=False)
    report = umup_fx.check(model, (_ids(),))
    assert report.ok, report.lines()
    out = model(_ids())
    targets = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(1))
    grads = _weight_grads(model, F.cross_entropy(out.flatten(0, 1), targets.flatten()))
    assert 0.05 <= grads["rel"] <= 5, grads  # q / k-like: it makes keys (rules §8)
    assert all(0.2 <= g <= 5 for n, g in grads.items() if n not in ("rel", "q.weight",
                                                                         "pos_key.weight")), grads


# -- grouped and depthwise convolutions (ConvNeXt) -------------------------------------
class DepthwiseNet(nn.Module):
    """ConvNeXt-style blocks: a 7x7 depthwise conv, a norm, 1x1 convs; a grouped 3x3 conv
    (4 groups) and a depthwise conv with channel multiplier 2; mean pool, a norm (as
    ConvNeXt: the pooled mean of normalised features is small), classifier."""

    def __init__(self, c: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 4, stride=4)
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.pw1, self.pw2 = nn.Conv2d(c, 4 * c, 1), nn.Conv2d(4 * c, c, 1)
        self.grouped = nn.Conv2d(c, c, 3, padding=1, groups=4)
        self.dw2 = nn.Conv2d(c, 2 * c, 3, padding=1, groups=c)
        self.head = nn.Linear(2 * c, classes)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.pw2(F.gelu(self.pw1(F.group_norm(self.dw(x), 1))))
        x = x + self.grouped(F.group_norm(x, 1))
        x = self.dw2(F.group_norm(x, 1))
        return F.cross_entropy(self.head(F.layer_norm(x.mean((2, 3)), (x.shape[1],))), labels)


def _pixels() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(B, 3, 16, 16, generator=gen), torch.randint(0, 10, (B,), generator=gen)


def _conv_plan(c: int) -> dict:
    torch.manual_seed(0)
    return umup_fx.transform(DepthwiseNet(c), _pixels(), check=False).umup_plan.params


def test_depthwise_conv_roles_and_fans() -> None:
    plan = _conv_plan(32)
    # per-group fans (rules.md "Grouped and depthwise convolutions"): a depthwise conv's
    # are fixed (k*k in, the channel multiplier out), so its channels never sort the
    # layers around it as input / output
    dw, dw2, grouped = plan["dw.weight"], plan["dw2.weight"], plan["grouped.weight"]
    assert (dw.role, dw.fan_in_value, dw.fan_out_value, dw.init) == ("fixed", 49, 1, "normal")
    assert (dw2.role, dw2.fan_in_value, dw2.fan_out_value) == ("fixed", 9, 2)
    assert (grouped.role, grouped.fan_in_value, grouped.fan_out_value) == ("hidden", 8 * 9, 8)
    assert [plan[n].role for n in ("stem.weight", "pw1.weight", "pw2.weight", "head.weight")] \
        == ["input", "hidden", "hidden", "output"]
    assert dw.lr_factor == pytest.approx(plan["dw.bias"].lr_factor)  # eta (x depth), as a bias
    wide = _conv_plan(64)  # twice the width: the depthwise LR does not move, hidden ones do
    assert wide["dw.weight"].lr_factor == pytest.approx(dw.lr_factor)
    assert wide["pw2.weight"].lr_factor == pytest.approx(plan["pw2.weight"].lr_factor / 2**0.5)


def test_depthwise_conv_graph_and_numbers() -> None:
    torch.manual_seed(0)
    inputs = _pixels()
    model = umup_fx.transform(DepthwiseNet(), inputs, check=False)
    convs = {n.args[1].name: n for n in graph_nodes(model) if n.target is ops.conv}
    assert convs["p_dw_weight"].kwargs["out_scale"] == pytest.approx(1 / 7)  # fan_in 7x7
    assert convs["p_dw_weight"].args[6] == 32  # groups kept
    assert convs["p_grouped_weight"].kwargs["out_scale"] == pytest.approx((8 * 9) ** -0.5)
    report = umup_fx.check(model, inputs)
    assert report.ok, report.lines()
    grads = _weight_grads(model, model(*inputs))
    assert all(0.2 <= g <= 5 for g in grads.values()), grads


# -- learned queries expanded over the batch (attention pooling, SigLIP's MAP head) -----
class QueryPool(nn.Module):
    """A learned query [1, n_q, d] over the batch, attending to the sequence: through
    nn.MultiheadAttention (its need_weights path writes the attention by hand) or SDPA."""

    def __init__(self, n_q: int = 1, sdpa: bool = False) -> None:
        super().__init__()
        self.sdpa = sdpa
        self.emb, self.mid = nn.Embedding(V, D), nn.Linear(D, D)
        self.query = nn.Parameter(torch.randn(1, n_q, D) * 0.02)
        self.attn = nn.MultiheadAttention(D, 4, batch_first=True)
        self.q, self.kv = nn.Linear(D, D), nn.Linear(D, 2 * D)
        self.head = nn.Linear(D, 10)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        h = F.layer_norm(h + self.mid(F.layer_norm(h, (D,))), (D,))
        if not self.sdpa:
            pooled = self.attn(self.query.expand(ids.shape[0], -1, -1), h, h)[0]
        else:
            q = self.q(self.query.repeat(ids.shape[0], 1, 1)).unflatten(-1, (4, -1)).transpose(1, 2)
            k, v = self.kv(h).unflatten(-1, (2, 4, -1)).permute(2, 0, 3, 1, 4)
            pooled = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return self.head(pooled.mean(1))


@pytest.mark.parametrize("sdpa", [False, True])
def test_learned_query_is_an_input_weight(sdpa: bool) -> None:
    torch.manual_seed(0)
    model = umup_fx.transform(QueryPool(n_q=2, sdpa=sdpa), (_ids(),))
    query = model.umup_plan.params["query"]
    assert (query.role, query.fan_in_value, query.fan_out_value, query.init) == (
        "input", 2, D, "normal")
    assert query.lr_factor == pytest.approx(D**-0.5)
    before = {n.target for n in model.original_graph.graph.nodes if n.op == "call_function"}
    after = [n.target for n in graph_nodes(model)]
    copy = torch.ops.aten.repeat.default if sdpa else torch.ops.aten.expand.default
    assert copy in before and ops.expand_param in after
    # nn.MultiheadAttention's (q * c) @ k^T, whose weights it also returns, is attention
    assert ops.softmax not in after and ops.matmul not in after
    assert (ops.scaled_dot_product_attention if sdpa else ops.attention_output_scale) in after
    assert torch.isfinite(model(_ids())).all()


@pytest.mark.parametrize("sdpa", [False, True])
def test_learned_query_numbers_at_init(sdpa: bool) -> None:
    torch.manual_seed(0)
    model = umup_fx.transform(QueryPool(sdpa=sdpa), (_ids(),), check=False)
    report = umup_fx.check(model, (_ids(),))
    assert report.ok, report.lines()
    out = model(_ids())
    targets = torch.randint(0, 10, (B,), generator=torch.Generator().manual_seed(1))
    grads = _weight_grads(model, F.cross_entropy(out, targets))
    assert all(0.2 <= g <= 5 for n, g in grads.items() if n != "query"), grads
    # the query's gradient is a query's: it reaches the logits only (rules §8's q / k band)
    assert S**-0.5 / 5 <= grads["query"] <= 5, grads


def test_attention_with_fewer_queries_than_keys_gives_unit_kv_gradients() -> None:
    """The truth: one query over S unit keys / values, a unit gradient at the output.
    Each key serves 1 query instead of S, so k / v get a further sqrt(S) (kv_group 1/S)."""
    gen = torch.Generator().manual_seed(0)
    n, heads, keys, d = 64, 4, 64, 16
    q = torch.randn(n, heads, 1, d, generator=gen).requires_grad_()
    k, v = (torch.randn(n, heads, keys, d, generator=gen).requires_grad_() for _ in range(2))
    for group, expect in ((1.0, keys**-0.5), (1 / keys, 1.0)):
        out = ops.scaled_dot_product_attention(q, k, v, kv_group=group)
        v.grad = None
        out.backward(torch.randn(out.shape, generator=gen))
        assert float(v.grad.pow(2).mean().sqrt()) == pytest.approx(expect, rel=0.25)


def test_query_tiled_over_a_real_axis_is_still_refused() -> None:
    class Tiled(QueryPool):
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            query = self.query.repeat(ids.shape[0], 2, 1)  # tiles the query axis too
            return self.head(self.attn(query, self.emb(ids), self.emb(ids))[0].mean(1))

    with pytest.raises(umup_fx.UmupError, match=r"(?s)'query'.*copy it over the batch only"):
        umup_fx.transform(Tiled(n_q=2), (_ids(),))


def test_deberta_relative_table_is_trained_from_unit_init() -> None:
    """The family's table: an input weight at unit init (classed as a gain it was frozen
    at ones, which a LayerNorm maps to zero), its norm's gain frozen at 1."""
    pytest.importorskip("transformers")
    from tests.families import FAMILIES

    torch.manual_seed(0)
    case = FAMILIES["DeBERTa-v2 (relative positions through LayerNorm)"]()
    model = umup_fx.transform(case.model, case.args, case.kwargs, check=False)
    plan = model.umup_plan.params
    table, gain = plan["deberta.encoder.rel_embeddings.weight"], plan["deberta.encoder.LayerNorm.weight"]
    assert (table.role, table.init, table.trainable) == ("input", "normal", True)
    assert (gain.role, gain.init, gain.trainable) == ("norm", "ones", False)
    rows = model.deberta.encoder.rel_embeddings.weight.detach()
    assert float(F.layer_norm(rows, rows.shape[-1:]).pow(2).mean().sqrt()) == pytest.approx(1, rel=0.01)


def test_siglip_map_head() -> None:
    """transformers' own MAP head: ``probe.repeat(B, 1, 1)`` into nn.MultiheadAttention."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.siglip.modeling_siglip import SiglipMultiheadAttentionPoolingHead

    torch.manual_seed(0)
    config = transformers.SiglipVisionConfig(hidden_size=D, intermediate_size=4 * D,
                                             num_attention_heads=4)
    # a linear in front, so that D is a width (a model input's axes are data dims)
    head = nn.Sequential(nn.Linear(16, D), SiglipMultiheadAttentionPoolingHead(config))
    x = torch.randn(B, S, 16, generator=torch.Generator().manual_seed(0))
    model = umup_fx.transform(head, (x,), check=False)
    probe = model.umup_plan.params["1.probe"]
    assert (probe.role, probe.fan_out_value, probe.init) == ("input", D, "normal")
    assert ops.expand_param in [n.target for n in graph_nodes(model)]
    report = umup_fx.check(model, (x,))
    assert report.ok, report.lines()
