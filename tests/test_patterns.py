"""Forms real models write that the rules now cover (rules.md, "Decisions"): graph
before / after and the numbers at init (umup_fx.check)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import umup_fx
from tests.tiny_models import graph_nodes
from umup_fx.runtime import ops

D, H, V = 64, 4, 64


class ClsDropoutHead(nn.Module):
    """A classifier on the cls position through dropout (HF's *ForSequenceClassification)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.mid = nn.Embedding(V, D), nn.Linear(D, D)
        self.drop, self.head = nn.Dropout(0.1), nn.Linear(D, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        h = h + self.mid(F.layer_norm(h, (D,)))
        return self.head(self.drop(h[:, 0]))


def _transform_covered(model: nn.Module, ids: torch.Tensor) -> nn.Module:
    """Transform ``model`` at ``ids``, failing on any op no rule covers."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", umup_fx.UncoveredOpWarning)
        return umup_fx.transform(model, (ids,))


def test_pick_through_dropout() -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, V, (4, 64), generator=torch.Generator().manual_seed(0))
    model = umup_fx.transform(ClsDropoutHead(), (ids,))
    before = [n.target for n in model.original_graph.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.select.int in before
    assert ops.pick in [n.target for n in graph_nodes(model)]
    report = umup_fx.check(model, (ids,))
    assert report.ok, report.lines()
    # unpicked, the encoder's gradient would be 1/sqrt(64) of unit (0.15 measured)
    mid = next(r for r in report.ops if r.weight == "mid.weight")
    assert 0.5 < mid.weight_grad_rms < 2


def _rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs).flatten(3).type_as(x)


class ComplexRopeBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(D)
        self.q, self.k, self.v, self.o = (nn.Linear(D, D, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        h = self.norm(x)
        q = _rope(self.q(h).view(b, s, H, -1), freqs).transpose(1, 2)
        k = _rope(self.k(h).view(b, s, H, -1), freqs).transpose(1, 2)
        v = self.v(h).view(b, s, H, -1).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.o(o.transpose(1, 2).reshape(b, s, D))


class ComplexRope(nn.Module):
    """torchtitan's RoPE: a complex buffer passed to every block, view_as_complex / real."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.out = nn.Embedding(V, D), nn.Linear(D, V, bias=False)
        self.layers = nn.ModuleList(ComplexRopeBlock() for _ in range(2))
        f = 1.0 / (10000 ** (torch.arange(0, D // H, 2).float() / (D // H)))
        angles = torch.outer(torch.arange(64).float(), f)
        self.register_buffer("freqs", torch.polar(torch.ones_like(angles), angles), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h, s = self.emb(ids), ids.shape[1]
        freqs = self.freqs[:s].view(1, s, 1, -1)
        for layer in self.layers:
            h = layer(h, freqs)
        return self.out(h)


def test_complex_rope_is_a_rotation() -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, V, (2, 32), generator=torch.Generator().manual_seed(0))
    model = _transform_covered(ComplexRope(), ids)
    assert not model.umup_plan.uncovered
    targets = [n.target for g in model.region_graphs().values() for n in g.graph.nodes]
    assert torch.ops.aten.view_as_complex.default in targets  # kept as written
    report = umup_fx.check(model, (ids,))
    assert report.ok, report.lines()
    assert model(torch.randint(0, V, (3, 48))).shape == (3, 48, V)  # another length


class OwnConstants(nn.Module):
    """A model's own scale constants where u-muP sets the scale: q pre-multiplied with
    SDPA at scale=1 (Whisper), a residual multiplier (Granite), logits divided (Granite)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.norm = nn.Embedding(V, D), nn.RMSNorm(D)
        self.q, self.k, self.v, self.o = (nn.Linear(D, D, bias=False) for _ in range(4))
        self.head = nn.Linear(D, V, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        b, s, _ = x.shape
        h = self.norm(x)
        q = (self.q(h) * (D // H) ** -0.5).view(b, s, H, -1).transpose(1, 2)
        k, v = (m(h).view(b, s, H, -1).transpose(1, 2) for m in (self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0)
        x = x + self.o(a.transpose(1, 2).reshape(b, s, D)) * 0.22
        return self.head(x) / 8.0


def test_own_constants_are_dropped() -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, V, (2, 32), generator=torch.Generator().manual_seed(0))
    model = umup_fx.transform(OwnConstants(), (ids,))
    consts = [n for n in model.original_graph.graph.nodes if n.target in (
        torch.ops.aten.mul.Tensor, torch.ops.aten.div.Tensor) and any(
        isinstance(a, float) for a in n.args)]
    assert len(consts) == 3  # before: the three constants
    after = [n for g in model.region_graphs().values() for n in g.graph.nodes
             if n.name in {c.name for c in consts}]
    assert not after  # after: each replaced by its operand
    assert sum("own constant" in note for note in model.umup_plan.notes) == 3
    report = umup_fx.check(model, (ids,))
    assert report.ok, report.lines()
    qk = [r for r in report.ops if r.weight in ("q.weight", "k.weight")]
    assert all(r.key_len == 32 and r.weight_grad_rms > 0.1 for r in qk)  # not scaled twice
    assert report.output_rms == pytest.approx(D ** -0.5, rel=0.3)  # not / 8


class HandLayerNorm(nn.Module):
    """A LayerNorm by hand: ``/ sqrt(var + eps)`` (older code) or Cohere's
    ``(x - mean) * rsqrt(mean((x - mean)^2) + eps)`` with ``x - mean`` written twice."""

    def __init__(self, cohere: bool) -> None:
        super().__init__()
        self.cohere = cohere
        self.emb, self.up, self.down = nn.Embedding(V, D), nn.Linear(D, 4 * D), nn.Linear(4 * D, D)
        self.gain, self.shift = nn.Parameter(torch.ones(D)), nn.Parameter(torch.zeros(D))
        self.head = nn.Linear(D, V, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        mu = h.mean(-1, keepdim=True)
        if self.cohere:
            n = (h - mu) * torch.rsqrt((h - mu).pow(2).mean(-1, keepdim=True) + 1e-5)
        else:
            n = (h - mu) / torch.sqrt(h.var(-1, keepdim=True, unbiased=False) + 1e-5)
        return self.head(h + self.down(F.gelu(self.up(n * self.gain + self.shift))))


@pytest.mark.parametrize("cohere", [False, True])
def test_layer_norm_by_hand(cohere: bool) -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, V, (2, 32), generator=torch.Generator().manual_seed(0))
    model = _transform_covered(HandLayerNorm(cohere), ids)
    plan = model.umup_plan
    assert plan.params["gain"].role == plan.params["shift"].role == "norm"
    assert not plan.uncovered
    # after: the statistic's arithmetic runs as written (no plain-add rule on x - mean)
    assert ops.add not in [n.target for n in graph_nodes(model)]
    report = umup_fx.check(model, (ids,))
    assert report.ok, report.lines()


class CrossAttention(nn.Module):
    """nn.TransformerDecoderLayer between an input and a readout linear."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.mem, self.head = nn.Linear(8, D), nn.Linear(8, D), nn.Linear(D, 8)
        self.layer = nn.TransformerDecoderLayer(D, H, 2 * D, dropout=0.0, batch_first=True,
                                                norm_first=True)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(self.inp(tgt), self.mem(memory)))


def test_multihead_cross_attention_splits_its_in_proj() -> None:
    """nn.MultiheadAttention as cross-attention splits in_proj_weight into q and kv."""
    torch.manual_seed(0)
    tgt, memory = torch.randn(2, 8, 8), torch.randn(2, 12, 8)
    before = [n.target for n in torch.export.export(CrossAttention(), (tgt, memory)).graph.nodes]
    assert torch.ops.aten.split_with_sizes.default in before
    model = umup_fx.transform(CrossAttention(), (tgt, memory), check=False)
    p = model.umup_plan.params["layer.multihead_attn.in_proj_weight"]
    assert p.fan_in_value == D and len(p.uses) == 2  # q, then k|v: each part a weight use
    # (its out axis comes out fixed, not width-like: a known gap, which umup_fx.check flags)
    assert model.umup_plan.params["layer.multihead_attn.in_proj_bias"].role == "bias"
    linears = [n for n in graph_nodes(model) if n.target is ops.linear]
    assert len(linears) == 3 + 2 + 3 + 2  # in / mem / head, self qkv / out, cross q / kv / out, MLP
    assert model(torch.randn(3, 5, 8), torch.randn(3, 7, 8)).shape == (3, 5, 8)


@pytest.mark.parametrize(("family", "verdict"), [
    ("LayerNorm by hand (mean / var)", "right"),
    ("ELECTRA discriminator (BCE)", "right"),  # post-norm (warned for depth), right at init
    ("Bloom (ALiBi)", "right"),  # baddbmm attention logits, factored tanh-GELU
    ("BERT", "right"),  # three tables summed before a norm: warned (0.18) as two plain adds
])
def test_coverage_verdicts(family: str, verdict: str) -> None:
    pytest.importorskip("transformers")
    from tests.families import check

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = check(family)
    assert result.verdict.startswith(verdict), (result.verdict, result.message[:300])
    assert "ScaleWarning" not in result.warned


class TokenDiscriminator(nn.Module):
    """ELECTRA's discriminator head: one logit per token, binary cross-entropy."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.mid, self.head = nn.Embedding(V, D), nn.Linear(D, D), nn.Linear(D, 1)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        h = h + self.mid(F.layer_norm(h, (D,)))
        logits = self.head(F.layer_norm(h, (D,))).squeeze(-1)
        return F.binary_cross_entropy_with_logits(logits, labels)


def test_binary_cross_entropy_is_the_two_class_loss() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(0, V, (4, 32), generator=gen), torch.randint(0, 2, (4, 32), generator=gen).float()
    model = umup_fx.transform(TokenDiscriminator(), (ids, labels))
    assert ops.binary_cross_entropy_with_logits in [n.target for n in graph_nodes(model)]
    assert not model.umup_plan.uncovered
    report = umup_fx.check(model, (ids, labels))
    assert report.ok, report.lines()
    # the value is PyTorch's loss on the same logits (the rule scales the backward only)
    x = torch.randn(64, requires_grad=True)
    y = torch.randint(0, 2, (64,), generator=gen).float()
    out = ops.binary_cross_entropy_with_logits(x, y, reference_rows=64)
    assert out.item() == pytest.approx(F.binary_cross_entropy_with_logits(x, y).item())
    out.backward()
    ref = torch.autograd.grad(F.binary_cross_entropy_with_logits(x, y), x)[0]
    assert torch.allclose(x.grad, ref * 2 * 64)


def _alibi(heads: int, seq: int) -> torch.Tensor:
    """Bloom's ALiBi bias, [heads, 1, seq]: a per-head slope times the key position."""
    slopes = 2.0 ** (-8.0 * torch.arange(1, heads + 1) / heads)
    return slopes[:, None, None] * torch.arange(seq)[None, None, :]


class AlibiBlock(nn.Module):
    """Bloom's attention and MLP, written as Bloom does (``bloom``: logits by
    ``alibi.baddbmm(q, k^T, alpha=d^-1/2)``, GELU as ``x (1 + 0.044715 x x)``) or in forms
    the rules already cover (``q @ k^T * c + alibi``, ``F.gelu(approximate="tanh")``)."""

    def __init__(self, bloom: bool) -> None:
        super().__init__()
        self.bloom = bloom
        self.emb, self.qkv, self.o = nn.Embedding(V, D), nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.up, self.down, self.head = nn.Linear(D, 4 * D), nn.Linear(4 * D, D), nn.Linear(D, V)

    def _gelu(self, x: torch.Tensor) -> torch.Tensor:
        if self.bloom:
            return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))
        return F.gelu(x, approximate="tanh")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        b, s, _ = x.shape
        q, k, v = (t.reshape(b, s, H, -1).transpose(1, 2).reshape(b * H, s, -1)
                   for t in self.qkv(F.layer_norm(x, (D,))).chunk(3, -1))
        alibi = _alibi(H, s).repeat(b, 1, 1)
        if self.bloom:
            logits = alibi.baddbmm(q, k.transpose(-1, -2), beta=1.0, alpha=(D // H) ** -0.5)
        else:
            logits = q @ k.transpose(-1, -2) * (D // H) ** -0.5 + alibi
        mask = torch.ones(s, s, dtype=torch.bool).triu(1)
        probs = logits.view(b, H, s, s).masked_fill(mask, float("-inf")).softmax(-1)
        a = torch.bmm(probs.view(b * H, s, s), v).view(b, H, s, -1).transpose(1, 2)
        x = x + self.o(a.reshape(b, s, D))
        x = x + self.down(self._gelu(self.up(F.layer_norm(x, (D,)))))
        return self.head(F.layer_norm(x, (D,)))


def test_alibi_baddbmm_attention_and_factored_gelu() -> None:
    """Bloom's baddbmm logits get the attention rule (its alpha becomes 1/d_head, the
    ALiBi bias stays as written) and its factored tanh-GELU the GELU rule: the same
    numbers as the covered forms of the same model."""
    ids = torch.randint(0, V, (2, 32), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    bloom = _transform_covered(AlibiBlock(bloom=True), ids)
    torch.manual_seed(0)
    plain = umup_fx.transform(AlibiBlock(bloom=False), (ids,))
    assert not bloom.umup_plan.uncovered
    baddbmm = [n for n in graph_nodes(bloom) if n.target is torch.ops.aten.baddbmm.default]
    assert len(baddbmm) == 1 and baddbmm[0].kwargs["alpha"] == pytest.approx(1 / (D // H))
    assert any(n.target is ops.gelu and n.kwargs["approximate"] == "tanh"
               for n in graph_nodes(bloom))
    out, ref = bloom(ids), plain(ids)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    out.sum().backward()
    ref.sum().backward()
    for (name, p), q in zip(bloom.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=name)
    report = umup_fx.check(bloom, (ids,))
    assert report.ok, report.lines()


class SquaredActivations(nn.Module):
    """ReLU^2 (Persimmon's ``relu2``: ``square(relu(x))``), a bare ``x ** 2`` on the
    activation path, and an RMSNorm by hand whose ``x.square()`` is a statistic."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.head = nn.Embedding(V, D), nn.Linear(D, V, bias=False)
        self.up1, self.down1 = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)
        self.up2, self.down2 = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        x = x + self.down1(torch.square(F.relu(self.up1(F.rms_norm(x, (D,))))))
        h = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6)  # a norm, not x^2
        x = x + self.down2(self.up2(h) ** 2)
        return self.head(F.rms_norm(x, (D,)))


def test_relu2_and_square_are_activations() -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, V, (4, 32), generator=torch.Generator().manual_seed(0))
    model = _transform_covered(SquaredActivations(), ids)
    acts = [n for n in graph_nodes(model) if n.target is ops.activation]
    assert sorted(n.args[1] for n in acts) == ["relu2", "square"]  # the norm's square: none
    assert torch.ops.aten.relu.default not in [n.target for n in graph_nodes(model)]
    # unit scale for a unit-normal input (rules §3): std(X^2) = sqrt(2), and
    # std(relu(X)^2) = sqrt(E[X^4]/2 - (E[X^2]/2)^2) = sqrt(5)/2
    assert ops.activation_scale("square") == pytest.approx(2**-0.5, rel=1e-6)
    assert ops.activation_scale("relu2") == pytest.approx(2 / 5**0.5, rel=1e-6)
    x = torch.randn(400_000, generator=torch.Generator().manual_seed(1))
    for kind in ("square", "relu2"):
        assert ops.activation(x, kind).std().item() == pytest.approx(1.0, rel=0.02)
    report = umup_fx.check(model, (ids,))
    assert report.ok, report.lines()


class SummedTables(nn.Module):
    """BERT's embeddings: word + token type + position lookups, summed, then a LayerNorm
    (``norm=False``: GPT-2's wte + wpe into the stream), one MLP branch, an LM head."""

    def __init__(self, norm: bool = True) -> None:
        super().__init__()
        self.word, self.kind, self.pos = nn.Embedding(V, D), nn.Embedding(2, D), nn.Embedding(32, D)
        self.norm = nn.LayerNorm(D) if norm else nn.Identity()
        self.mid, self.head = nn.Linear(D, D), nn.Linear(D, V)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1]).unsqueeze(0)  # [1, S]: broadcast over the batch
        h = self.norm(self.word(ids) + self.kind(torch.zeros_like(ids)) + self.pos(pos))
        h = h + self.mid(F.layer_norm(h, (D,)))
        return F.cross_entropy(self.head(F.layer_norm(h, (D,))).flatten(0, 1), labels.flatten())


def test_add_tables_is_the_sum_with_each_table_given_its_gradient() -> None:
    # Against PyTorch's own sum: forward n^-1/2 of it; backward each table the sum's
    # gradient, a table broadcast over B rows the sum of its copies times B^-1/2.
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(4, 8, 16, dtype=torch.float64, generator=gen, requires_grad=True)
            for _ in range(2))
    c = torch.randn(1, 8, 16, dtype=torch.float64, generator=gen, requires_grad=True)
    g = torch.randn(4, 8, 16, dtype=torch.float64, generator=gen)
    out = ops.add_tables(a, b, c)
    torch.testing.assert_close(out, (a + b + c) / 3**0.5)
    out.backward(g)
    torch.testing.assert_close(a.grad, g)
    torch.testing.assert_close(b.grad, g)
    torch.testing.assert_close(c.grad, g.sum(0, keepdim=True) / 2)
    c.grad = None
    ops.add_tables(a, b, c, grad_scales=[1.0, 1.0, 0.25]).backward(g)  # reference sizes
    torch.testing.assert_close(c.grad, g.sum(0, keepdim=True) / 4)


@pytest.mark.parametrize("norm", [True, False], ids=["bert", "gpt2"])
def test_sum_of_tables(norm: bool) -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    ids, labels = (torch.randint(0, V, (4, 16), generator=gen) for _ in range(2))
    before = [n.target for n in torch.export.export(SummedTables(norm), (ids, labels)).graph.nodes]
    assert before.count(torch.ops.aten.add.Tensor) >= 2 + 1  # the tables' two, the branch's
    model = umup_fx.transform(SummedTables(norm), (ids, labels))
    after = graph_nodes(model)
    (summed,) = [n for n in after if n.target is ops.add_tables]
    # each table's lookup is its own module's call (hooks, FSDP2 units)
    assert [a.args[0].args[1] for a in summed.args] == ["word", "kind", "pos"]
    assert summed.kwargs["grad_scales"] == [1.0, 1.0, 0.5]  # the position table: B^-1/2
    assert not [n for n in after if n.target is ops.add]  # no plain add left of the sum
    report = umup_fx.check(model, (ids, labels))
    assert report.ok, report.lines()
    from umup_fx.diagnose.tracking import measure

    records = {r.node: r for r in measure(model, ids, labels).records}
    total = records[summed.name]
    assert 0.8 < total.out_rms < 1.25  # unit: was sqrt(2) (the broadcast add unscaled)
    for table in ("word", "kind"):  # each table gets the sum's gradient
        lookup = next(r for r in records.values() if r.weight == f"{table}.weight")
        assert lookup.grad_rms == pytest.approx(total.grad_rms, rel=1e-6)
    for table in ("word", "kind", "pos"):  # was 0.18 for word / kind behind BERT's norm
        assert 0.5 < next(r for r in report.ops if r.weight == f"{table}.weight").grad_rms < 2


class FeaturesPlusPositions(nn.Module):
    """Whisper's encoder front: conv features [B, S, d] plus a [S, d] position lookup."""

    def __init__(self, shared: bool = False) -> None:
        super().__init__()
        self.shared = shared
        self.conv = nn.Conv1d(8, D, 3, padding=1)
        self.pos, self.mid, self.head = nn.Embedding(32, D), nn.Linear(D, D), nn.Linear(D, V)

    def forward(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.conv(feats)).transpose(1, 2)
        extra = self.mid(h[:1]) if self.shared else self.pos(torch.arange(h.shape[1]))
        h = F.layer_norm(h + extra, (D,))
        return F.cross_entropy(self.head(h).flatten(0, 1), labels.flatten())


def test_broadcast_add_scales_each_operand_against_pytorch() -> None:
    # Forward the plain add's 2^-1/2 of PyTorch's broadcast sum; backward each operand
    # its grad_scale times PyTorch's gradient of the sum (the broadcast one summed).
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4, 8, 16, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(8, 16, dtype=torch.float64, generator=gen, requires_grad=True)
    g = torch.randn(4, 8, 16, dtype=torch.float64, generator=gen)
    out = ops.add(a, b, grad_scales=(0.5**0.5, 0.5**0.5 / 2))
    torch.testing.assert_close(out, (a + b) / 2**0.5)
    out.backward(g)
    torch.testing.assert_close(a.grad, g / 2**0.5)
    torch.testing.assert_close(b.grad, g.sum(0) / 2**0.5 / 2)


def test_broadcast_add_on_its_own_path() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    feats, labels = torch.randn(4, 8, 16, generator=gen), torch.randint(0, V, (4, 16), generator=gen)
    before = torch.export.export(FeaturesPlusPositions(), (feats, labels)).graph.nodes
    (add,) = [n for n in before if n.target is torch.ops.aten.add.Tensor]
    assert add.args[0].meta["val"].shape != add.args[1].meta["val"].shape
    with warnings.catch_warnings():
        warnings.simplefilter("error", umup_fx.UncoveredOpWarning)
        model = umup_fx.transform(FeaturesPlusPositions(), (feats, labels))
    (summed,) = [n for n in graph_nodes(model) if n.target is ops.add]
    # the position lookup is broadcast over B = 4 rows: its summed gradient x 4^-1/2
    assert summed.kwargs["grad_scales"] == pytest.approx((0.5**0.5, 0.5**0.5 / 2))
    report = umup_fx.check(model, (feats, labels))
    assert report.ok, report.lines()
    from umup_fx.diagnose.tracking import measure

    records = {r.node: r for r in measure(model, feats, labels).records}
    assert 0.8 < records[summed.name].out_rms < 1.25  # unscaled, the sum was sqrt(2)
    pos = next(r for r in report.ops if r.weight == "pos.weight")
    assert 0.5 < pos.grad_rms < 2  # the lookup's gradient as an unbroadcast operand's


def test_broadcast_add_read_elsewhere_keeps_the_tie() -> None:
    # h + mid(h[:1]): the broadcast operand's activations (h) feed the add's other side
    # too, so no constant may go on its edge alone: the tied plain add, and a note.
    gen = torch.Generator().manual_seed(0)
    feats, labels = torch.randn(4, 8, 16, generator=gen), torch.randint(0, V, (4, 16), generator=gen)
    model = umup_fx.transform(FeaturesPlusPositions(shared=True), (feats, labels))
    (summed,) = [n for n in graph_nodes(model) if n.target is ops.add]
    assert "grad_scales" not in summed.kwargs
    assert any(summed.name in note and "broadcast" in note for note in model.umup_plan.notes)


def test_an_add_with_no_rule_is_listed() -> None:
    # The coverage pass lists an add of two activations that no rule and no "keeps
    # scale" fact covers (before, every out-of-place add was taken as covered).
    from umup_fx.passes.coverage import find_uncovered

    from umup_fx import meta
    from umup_fx.capture.trace import capture
    from umup_fx.options import Options
    from umup_fx.pipeline import plan_graph

    gen = torch.Generator().manual_seed(0)
    feats, labels = torch.randn(4, 8, 16, generator=gen), torch.randint(0, V, (4, 16), generator=gen)
    gm = capture(FeaturesPlusPositions(), (feats, labels)).gm
    plan_graph(gm, Options.build(None))
    (add,) = [n for n in gm.graph.nodes if meta.get(n, meta.RULE) == "add"]
    assert not meta.graph_meta(gm)[meta.UNCOVERED]
    del meta.node_meta(add)[meta.RULE]
    find_uncovered(gm)
    assert [name for name, *_ in meta.graph_meta(gm)[meta.UNCOVERED]] == [add.name]
