"""umup_fx.check (rules §8): a right model passes, a deliberately broken one is flagged
with its op and source line, by check, by transform's warning and by the CLI."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import umup_fx
from tests.tiny_models import graph_nodes
from umup_fx import meta
from umup_fx.__main__ import main
from umup_fx.runtime import ops

D, VOCAB = 64, 96


class Block(nn.Module):
    def __init__(self, inner: float) -> None:
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(D), nn.Linear(D, 4 * D), nn.Linear(4 * D, D)
        self.inner = inner

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.down(torch.relu(self.up(self.norm(h))) * self.inner)  # broken if != 1


class TinyLM(nn.Module):
    """Embedding, two pre-norm MLP blocks, a readout; ``inner`` breaks it the way a
    model's own constant that no rule knows does (a multiplier inside the MLP)."""

    def __init__(self, inner: float = 1.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList(Block(inner) for _ in range(2))
        self.head = nn.Linear(D, VOCAB, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))


def broken() -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    return TinyLM(inner=30.0), (_ids(),)


def test_a_right_model_passes() -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", umup_fx.ScaleWarning)
        model = umup_fx.transform(TinyLM(), (_ids(),))
    report = umup_fx.check(model, (_ids(),))
    assert report.ok, report.lines()
    assert len(report.ops) == 6  # embedding, 2 x (up, down), head
    assert report.output_target == pytest.approx(D ** -0.5)
    assert 0.5 < report.output_rms / report.output_target < 2


def test_check_flags_a_broken_model_with_its_source_line() -> None:
    model, inputs = broken()
    with pytest.warns(umup_fx.ScaleWarning, match="self.inner") as caught:
        model = umup_fx.transform(model, inputs)
    assert len([w for w in caught if w.category is umup_fx.ScaleWarning]) == 1  # once
    report = umup_fx.check(model, inputs)
    assert not report.ok
    # each block's MLP output is 30x unit, and so are the gradients reaching its up-projection
    whats = {(f.op.weight, f.what) for f in report.flags}
    assert {("blocks.0.down.weight", "output"), ("blocks.1.down.weight", "output"),
            ("blocks.0.up.weight", "output grad")} <= whats
    down = next(f for f in report.flags if f.op.weight == "blocks.0.down.weight")
    assert 10 < down.value < 90 and "self.inner" in down.op.source
    assert all(f.op.weight and "test_check.py" in f.op.source for f in report.flags), report.lines()
    assert "blocks.1.down.weight" in str(report)


def test_check_changes_nothing() -> None:
    torch.manual_seed(0)
    model = umup_fx.transform(nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16),
                                            nn.Dropout(0.5), nn.Linear(16, 4)),
                              (torch.randn(32, 8),), check=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(32, 8)
    rng = torch.get_rng_state()
    umup_fx.check(model, (x,))
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_check_needs_a_transformed_model() -> None:
    with pytest.raises(umup_fx.UmupError, match="umup_fx.transform"):
        umup_fx.check(TinyLM(), (_ids(),))


def test_cli_check_exit_status_and_plot(tmp_path, capsys) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "scales.png"
    assert main(["check", "tests.test_check:broken", "--plot", str(png)]) == 1
    out = capsys.readouterr().out
    assert "blocks.0.down.weight" in out and "outside" in out
    assert png.stat().st_size > 1000
    assert main(["check", "tests.test_check:TinyLM", "--input", f"long:4x16:{VOCAB}"]) == 0


# -- what the check expects where rows or key positions agree (rules §8) ---------------
def test_row_coherence_and_key_spread_measure_what_they_say() -> None:
    from umup_fx.diagnose.tracking import _row_coherence, _spread

    gen = torch.Generator().manual_seed(0)
    g, x = torch.randn(2, 64, 32, generator=gen), torch.randn(2, 64, 16, generator=gen)
    assert _row_coherence(g, x) == pytest.approx(1.0, abs=0.15)  # independent rows
    same_g, same_x = g[:1, :1].expand(2, 64, 32), x[:1, :1].expand(2, 64, 16)
    assert _row_coherence(same_g, same_x) == pytest.approx(128**0.5)  # one row, 128 times
    # the unscaled weight gradient is then sqrt(rows) times the independent rows' size
    w = (same_g.reshape(-1, 32).T @ same_x.reshape(-1, 16)).pow(2).mean().sqrt()
    assert float(w) / 128**0.5 == pytest.approx(
        _row_coherence(same_g, same_x) * float(same_g.pow(2).mean().sqrt() * same_x.pow(2).mean().sqrt()),
        rel=1e-4)
    k = torch.randn(2, 4, 16, 8, generator=gen)
    assert _spread(k) == pytest.approx((15 / 16) ** 0.5, rel=0.1)  # about its own mean
    assert _spread(k[:, :, :1].expand(2, 4, 16, 8)) == pytest.approx(0.0, abs=1e-6)


def test_weight_band_widens_only_by_the_measured_coherence() -> None:
    from umup_fx.diagnose.tracking import OpScale
    from umup_fx.diagnose.unit_check import bands

    op = OpScale("n", "linear", "linear", 1.0, weight="w", role="hidden")
    assert bands(op)["weight grad"] == (0.2, 5.0)
    op.row_coherence = 3.0
    assert bands(op)["weight grad"] == pytest.approx((0.2, 15.0))
    assert bands(op)["output grad"] == (0.2, 5.0)  # the output gradient is the rule's
    op.key_len, op.key_spread = 16, 0.5
    assert bands(op)["output grad"] == pytest.approx((0.2 / 4 * 0.5, 5.0))


def test_reference_cross_attention_weight_grad_is_its_row_coherence() -> None:
    """The reference library's own ops, an encoder self-attention then a decoder's
    cross-attention to it at init: the encoder's output projection gets a weight
    gradient far above 5 (every encoder position gets the same gradient through the
    near-uniform cross-attention, and reads the same near-uniform self-attention
    output), and the measured row coherence accounts for it (rules §8)."""
    from umup_fx.diagnose.tracking import _row_coherence, rms

    U = pytest.importorskip("unit_scaling.functional")
    gen = torch.Generator().manual_seed(0)
    b, s, d, h = 2, 64, 64, 4

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    def attend(q_in: torch.Tensor, kv_in: torch.Tensor) -> torch.Tensor:
        q, k, v = (U.linear(t, rand(d, d), None).view(b, s, h, -1).transpose(1, 2)
                   for t in (q_in, kv_in, kv_in))
        return U.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, d)

    w_out = rand(d, d).requires_grad_()
    attn = attend(rand(b, s, d), rand(b, s, d))
    memory = U.linear(attn, w_out, None)
    memory.retain_grad()
    U.linear(attend(rand(b, s, d), memory), rand(d, d), None).backward(rand(b, s, d))
    coherence = _row_coherence(memory.grad, attn)
    assert rms(w_out.grad) > 5 and coherence > 5
    assert rms(w_out.grad) == pytest.approx(coherence * rms(memory.grad) * rms(attn), rel=0.15)


def test_query_coherence_measures_what_it_says_and_moves_v_output_grad_only() -> None:
    from umup_fx.diagnose.tracking import OpScale, _query_coherence
    from umup_fx.diagnose.unit_check import bands

    gen = torch.Generator().manual_seed(0)
    g = torch.randn(2, 4, 64, 64, generator=gen)
    assert _query_coherence(g) == pytest.approx(1.0, abs=0.1)  # independent queries
    assert _query_coherence(g[:, :, :1].expand(2, 4, 64, 64)) == pytest.approx(8.0)  # alike
    op = OpScale("n", "linear", "linear", 1.0, weight="w", role="hidden")
    op.query_coherence = 3.0
    assert bands(op)["output grad"] == pytest.approx((0.2, 15.0))
    assert bands(op)["weight grad"] == (0.2, 5.0)  # the weight's is its rows' coherence


def test_reference_pooled_self_attention_v_grad_is_its_query_coherence() -> None:
    """The reference library's own ops: an encoder self-attention read by one learned
    query (a MAP pooling head) at init. Every position gets nearly the same gradient,
    and near-uniform attention hands each value their sum: v's gradient is the measured
    query coherence times the attention output's (rules §8)."""
    from umup_fx.diagnose.tracking import _query_coherence, rms

    U = pytest.importorskip("unit_scaling.functional")
    gen = torch.Generator().manual_seed(0)
    b, s, d, h = 2, 64, 64, 4

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    def heads(t: torch.Tensor) -> torch.Tensor:
        return U.linear(t, rand(d, d), None).view(b, t.shape[1], h, -1).transpose(1, 2)

    x = rand(b, s, d).requires_grad_()
    q, k, v = heads(x), heads(x), heads(x)
    v.retain_grad()
    out = U.scaled_dot_product_attention(q, k, v)
    out.retain_grad()
    enc = U.linear(out.transpose(1, 2).reshape(b, s, d), rand(d, d), None)
    pooled = U.scaled_dot_product_attention(heads(rand(1, 1, d).expand(b, 1, d)), heads(enc),
                                            heads(enc))
    pooled.backward(rand(*pooled.shape))
    coherence = _query_coherence(out.grad)
    assert coherence > 5
    assert rms(v.grad) / rms(out.grad) == pytest.approx(coherence, rel=0.15)


class TwoTermLogits(nn.Module):
    """Attention logits assembled from two products (DeBERTa's content + position terms,
    here both from the hidden states): not the hand-written attention pattern, so a
    stand-alone softmax weighing values."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.q, self.k, self.v, self.pos_k, self.o = (nn.Linear(D, D) for _ in range(5))
        self.head = nn.Linear(D, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        x = F.layer_norm(h, (D,))
        q, k, v = self.q(x), self.k(x), self.v(x)
        logits = (q @ k.transpose(-1, -2) + q @ self.pos_k(x).transpose(-1, -2)) / (2 * D) ** 0.5
        h = h + self.o(torch.softmax(logits, -1) @ v)
        return self.head(F.layer_norm(h, (D,)))


def test_softmax_weighing_values_has_q_k_projections() -> None:
    # Its logits' projections get the q / k band (their gradients near S^-1/2 at init,
    # rules §8), as SDPA's do: before, the check flagged q, k and pos_k near 0.1.
    from umup_fx.diagnose.tracking import _qk_projections

    ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = umup_fx.transform(TwoTermLogits(), (ids,), check=False)
    assert ops.softmax in [n.target for n in graph_nodes(model)]
    weights = set()
    for path, gm in model.region_graphs().items():  # each linear runs as its own call
        module = model.get_submodule(path) if path else model
        for sub, name in _qk_projections(gm, module):
            owner = module.get_submodule(sub.rstrip(".")) if sub else module
            node = next(n for n in owner.graph_module.graph.nodes if n.name == name)
            weights.add(meta.get(node, meta.WEIGHT))
    assert weights == {"q.weight", "k.weight", "pos_k.weight"}
    report = umup_fx.check(model, (ids,))
    assert report.ok, report.lines()
    qk = [r for r in report.ops if r.weight in weights]
    assert all(r.key_len == 16 and r.weight_grad_rms < 0.2 for r in qk)  # low, and in band


# -- an embedding's table at the model's sizes (rules §8, issue 30 item 6) -------------


def test_lookup_factor_is_the_row_sums_size_u_mup_predicts() -> None:
    """sqrt(1 - rho + rho sum_v c_v^2 / N) against the exact norm of the rows' sums."""
    from umup_fx.diagnose.tracking import lookup_factor

    gen = torch.Generator().manual_seed(0)
    rows, n, d = 64, 4096, 32
    zipf = 1.0 / torch.arange(1, rows + 1).double()
    ids = torch.multinomial(zipf, n, replacement=True, generator=gen)
    counts = torch.bincount(ids, minlength=rows).double()
    for rho in (0.0, 0.05, 0.3, 1.0):
        g = rho ** 0.5 * torch.randn(d, generator=gen) + (1 - rho) ** 0.5 * torch.randn(n, d, generator=gen)
        exact = float(torch.zeros(rows, d).index_add_(0, ids, g).norm() / g.norm())
        assert lookup_factor(g, ids, rows) == pytest.approx(exact, rel=0.1)
    # every token the same gradient: each row's sum is c_v times it
    assert lookup_factor(torch.ones(n, d), ids, rows) == pytest.approx(
        float((counts.pow(2).sum() / n).sqrt()))
    uniform = torch.randint(0, rows, (n,), generator=gen)
    assert lookup_factor(torch.randn(n, d, generator=gen), uniform, rows) == pytest.approx(1, abs=0.05)


def _on_bytes(family: str) -> tuple[nn.Module, dict]:
    transformers = pytest.importorskip("transformers")
    from examples.data import get_batch, load_corpus

    ids = get_batch(load_corpus(200_000), 16, 128, torch.Generator().manual_seed(0))[0]
    torch.manual_seed(0)
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=256))
    else:
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=256,
            bos_token_id=0, eos_token_id=0))
    return model, {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_small_vocab_lm_on_text_passes_with_its_tables_predicted(family: str) -> None:
    """Bytes of text over 256 rows: a few rows (space, 'e') take hundreds of the 2048
    tokens, whose gradients share a part, so the tables' gradients are far above 5 and
    the check expects it (GPT-2's position table too: each row sums the batch's)."""
    model, kwargs = _on_bytes(family)
    with warnings.catch_warnings():
        warnings.simplefilter("error", umup_fx.ScaleWarning)
        umup_fx.transform(model, (), kwargs)
    report = umup_fx.check(model, (), kwargs)
    assert report.ok, report.lines()
    tables = [r for r in report.ops if r.rule == "embedding"]
    tokens = tables[0]
    assert tokens.weight_grad_rms > 5  # outside the plain band: what used to warn
    # the prediction is the measurement's size: within 40% of factor x output gradient
    assert 0.6 < tokens.weight_grad_rms / (tokens.lookup_factor * tokens.grad_rms) < 1.4
    if family == "gpt2":
        positions = tables[1]
        assert positions.summed_copies == 16 and positions.lookup_factor > 1.2
        assert positions.grad_rms > 5


def test_an_embedding_with_its_weight_gradient_unscaled_is_still_flagged(monkeypatch) -> None:
    """The band moves by the prediction, not by what was measured: a table whose
    gradient misses u-muP's (V / N)^1/2 (here 40x too large) stays flagged."""
    model, kwargs = _on_bytes("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        umup_fx.transform(model, (), kwargs, check=False)
    real = ops.linears.scale_bwd

    def broken(x: torch.Tensor, scale: float) -> torch.Tensor:
        return real(x, scale * 40 if x.shape == (256, 64) else scale)

    monkeypatch.setattr(ops.linears, "scale_bwd", broken)
    report = umup_fx.check(model, (), kwargs)
    assert ("model.embed_tokens.weight", "weight grad") in {(f.op.weight, f.what) for f in report.flags}
