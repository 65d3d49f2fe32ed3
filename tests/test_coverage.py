"""Coverage: the rules for common ops (graph before / after), real families end to end,
and a fuzzer over the supported ops. docs/rules.md §3 says what each rule computes."""

from __future__ import annotations

import math
import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import umup_fx
from tests.families import ConvNet, check
from tests.tiny_models import graph_nodes
from umup_fx.runtime import ops


def _targets(model: nn.Module) -> list:
    return [n.target for n in graph_nodes(model) if n.op == "call_function"]


def _grad_rms(model: nn.Module, out: torch.Tensor, logits: bool = False) -> dict[str, float]:
    """Weight-gradient RMS after a unit-scale gradient arrives at ``out``; for returned
    ``logits``, a mean cross-entropy's (their readout scales its backward for a loss
    outside the model, rules §3)."""
    gen = torch.Generator().manual_seed(3)
    if logits:
        targets = torch.randint(0, out.shape[-1], out.shape[:-1], generator=gen)
        F.cross_entropy(out.flatten(0, -2), targets.flatten()).backward()
    else:
        (out * torch.randn(out.shape, generator=gen)).sum().backward()
    return {n: float(p.grad.pow(2).mean().sqrt()) for n, p in model.named_parameters()
            if p.grad is not None and p.dim() > 1}


class _Act(nn.Module):
    def __init__(self, act, d: int = 64, gated: bool = False) -> None:
        super().__init__()
        self.act, self.gated = act, gated
        self.up, self.gate, self.down = nn.Linear(d, 4 * d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.up(x))
        return self.down(h * self.gate(x) if self.gated else h)


_ACTS = {
    "relu": F.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "softplus": F.softplus,
    "leaky_relu": lambda x: F.leaky_relu(x, 0.2), "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


@pytest.mark.parametrize("name", list(_ACTS))
def test_activation_rule_gives_unit_output(name: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(512, 64)
    model = umup_fx.transform(_Act(_ACTS[name]), (x,))
    assert not model.umup_plan.uncovered
    acts = [n for n in graph_nodes(model) if n.target is ops.activation]
    assert len(acts) == 1 and acts[0].args[1] == name
    assert not any("sigmoid" in str(t) for t in _targets(model))  # quick-GELU is one op
    h = ops.activation(torch.randn(200_000), name, **acts[0].kwargs)
    assert h.std().item() == pytest.approx(1.0, rel=0.02)


@pytest.mark.parametrize(("act", "kind"), [(lambda x: F.gelu(x, approximate="tanh"), "gelu"),
                                           (F.relu, "relu"), (F.silu, None)])
def test_gated_units(act, kind: str | None) -> None:
    torch.manual_seed(0)
    x = torch.randn(512, 64)
    model = umup_fx.transform(_Act(act, gated=True), (x,))
    glus = [n for n in graph_nodes(model) if n.target in (ops.glu, ops.silu_glu)]
    assert len(glus) == 1 and not model.umup_plan.uncovered
    if kind is None:  # up * silu(gate): the reference library's rule
        assert glus[0].target is ops.silu_glu
    else:
        assert glus[0].target is ops.glu and glus[0].args[2] == kind
    up, gate = torch.randn(2, 200_000).unbind()
    out = glus[0].target(up, gate, *glus[0].args[2:], **glus[0].kwargs)
    assert out.pow(2).mean().sqrt().item() == pytest.approx(1.0, rel=0.05)


class _Weights(nn.Module):
    """A weight through ``x @ W.T``, one through einsum, a table indexed directly, a
    position table sliced and added: the forms people write by hand."""

    def __init__(self, vocab: int = 50, d: int = 32, seq: int = 16) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab, d))
        self.pos = nn.Parameter(torch.randn(seq, d))
        self.w_in = nn.Parameter(torch.randn(4 * d, d))
        self.w_out = nn.Parameter(torch.randn(d, 4 * d))
        self.head = nn.Parameter(torch.randn(vocab, d))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.table[ids] + self.pos[: ids.shape[1]]
        h = torch.einsum("bsd,fd->bsf", F.layer_norm(x, x.shape[-1:]), self.w_in)
        x = x + F.relu(h) @ self.w_out.T
        return F.layer_norm(x, x.shape[-1:]) @ self.head.T


def test_weights_used_by_hand_get_linear_and_embedding_rules() -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (4, 16))
    model = umup_fx.transform(_Weights(), (ids,))
    p = model.umup_plan.params
    assert (p["table"].role, p["pos"].role, p["head"].role) == ("input", "input", "output")
    assert (p["w_in"].fan_in_value, p["w_in"].fan_out_value) == (32, 128)
    assert (p["w_out"].fan_in_value, p["w_out"].fan_out_value) == (128, 32)
    assert p["w_in"].depth_scaled and p["w_out"].depth_scaled  # inside the branch
    targets = _targets(model)
    assert ops.embedding in targets and ops.einsum_linear in targets
    assert ops.broadcast_param in targets and targets.count(ops.linear) == 2
    out = model(ids)
    assert out.pow(2).mean().sqrt().item() == pytest.approx(32**-0.5, rel=0.2)
    grads = _grad_rms(model, out, logits=True)
    assert all(0.2 < g < 5 for g in grads.values()), grads


class _Tokens(nn.Module):
    """ViT-style: patch conv, a cls token concatenated, a position table added."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, d, 4, stride=4)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.zeros(1, 17, d))
        self.head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        h = F.layer_norm(x, x.shape[-1:])
        x = x + F.scaled_dot_product_attention(h, h, h)  # tokens reach the cls position
        return self.head(F.layer_norm(x, x.shape[-1:])[:, 0])


def test_cls_token_position_table_and_patch_conv() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 3, 16, 16)
    model = umup_fx.transform(_Tokens(), (x,))
    p = model.umup_plan.params
    assert [p[n].role for n in ("cls", "pos", "patch.weight", "head.weight")] == \
        ["input", "input", "input", "output"]
    assert p["patch.weight"].fan_in_value == 3 * 4 * 4 and p["pos"].fan_in_value == 17
    assert p["cls"].init == "normal" and model.cls.std() > 0.5  # unit init, not zeros
    targets = _targets(model)
    assert {ops.expand_param, ops.broadcast_param, ops.conv, ops.pick} <= set(targets)
    grads = _grad_rms(model, model(x), logits=True)
    assert all(0.2 < g < 5 for g in grads.values()), grads


def test_conv_net_transforms_with_strided_shapes() -> None:
    """Strided convs give export floor-division shapes; they used to escape as sympy's
    NotImplementedError."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    model = umup_fx.transform(ConvNet(), (x,))
    p = model.umup_plan.params
    assert p["stem.weight"].role == "input" and p["conv1.weight"].role == "hidden"
    assert p["conv1.weight"].fan_in_value == 16 * 9 and p["head.weight"].role == "output"
    assert p["bn.weight"].role == "norm" and not model.umup_plan.uncovered
    assert {ops.batch_norm, ops.mean_over, ops.max_pool} <= set(_targets(model))
    model.eval()  # batch norm follows module.training: running statistics in eval
    assert torch.isfinite(model(x)).all()


class _GroupNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.gn = nn.Conv2d(3, 32, 3, padding=1), nn.GroupNorm(4, 32)
        self.c2, self.head = nn.Conv2d(32, 32, 3, padding=1), nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.gn(self.c1(x))
        x = x + self.c2(F.silu(x))
        return self.head(x.mean((2, 3)))


def test_group_norm_and_mean_pooling() -> None:
    torch.manual_seed(0)
    model = umup_fx.transform(_GroupNormNet(), (torch.randn(4, 3, 16, 16),))
    p = model.umup_plan.params
    assert [p[n].role for n in ("c1.weight", "gn.weight", "gn.bias", "c2.weight", "head.weight")] \
        == ["input", "norm", "norm", "hidden", "output"]
    assert p["gn.bias"].init == "zeros" and not p["gn.weight"].trainable  # non-parametric
    gn = next(n for n in graph_nodes(model) if n.target is ops.group_norm)
    assert gn.args[2:4] == (None, None)
    assert ops.mean_over in _targets(model) and not model.umup_plan.uncovered


class _Scaled(nn.Module):
    """Gemma's sqrt(d) on the embedding, T5's d^-1/2 before a tied head."""

    def __init__(self, vocab: int = 40, d: int = 64, constants: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.fc = nn.Linear(d, d)
        self.up, self.down = (math.sqrt(d), d**-0.5) if constants else (1.0, 1.0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids) * self.up
        x = x + self.fc(F.rms_norm(x, (64,)))
        return F.linear(F.rms_norm(x, (64,)) * self.down, self.emb.weight)


def test_model_constants_where_umup_sets_the_scale_are_dropped() -> None:
    ids = torch.randint(0, 40, (4, 16), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    model = umup_fx.transform(_Scaled(), (ids,))
    notes = model.umup_plan.notes
    assert sum("constant" in n for n in notes) == 2 and "constant" in umup_fx.explain(model)
    consts = [n for n in graph_nodes(model) if n.target is torch.ops.aten.mul.Tensor
              and any(isinstance(a, float) for a in n.args)]
    assert not consts
    torch.manual_seed(0)  # the same model written without the constants: the same numbers
    plain = umup_fx.transform(_Scaled(constants=False), (ids,))
    torch.testing.assert_close(model(ids), plain(ids))


class _Backbone(nn.Module):
    def __init__(self, vocab: int = 40, d: int = 64) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        return x + self.fc2(F.gelu(self.fc1(F.layer_norm(x, (64,)))))  # hidden states out


def test_backbone_returning_hidden_states_keeps_width_like_dims() -> None:
    torch.manual_seed(0)
    model = umup_fx.transform(_Backbone(), (torch.randint(0, 40, (4, 16)),))
    p = model.umup_plan.params
    assert (p["emb.weight"].role, p["fc1.weight"].role, p["fc2.weight"].role) == \
        ("input", "hidden", "hidden")
    assert p["fc1.weight"].fp8 and any("hidden states" in n for n in model.umup_plan.notes)


class _PostNorm(nn.Module):
    def __init__(self, d: int = 32, layers: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, d)
        self.fcs = nn.ModuleList(nn.Linear(d, d) for _ in range(layers))
        self.head = nn.Linear(d, 40)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        for fc in self.fcs:
            x = F.layer_norm(x + fc(x), x.shape[-1:])
        return self.head(x)


def test_post_norm_is_warned_and_noted() -> None:
    torch.manual_seed(0)
    with pytest.warns(umup_fx.PostNormWarning, match="pre-norm"):
        model = umup_fx.transform(_PostNorm(), (torch.randint(0, 40, (2, 8)),))
    assert any("post-norm" in n for n in model.umup_plan.notes)
    with warnings.catch_warnings():
        warnings.simplefilter("error", umup_fx.PostNormWarning)  # a pre-norm stack: silent
        umup_fx.transform(_Backbone(), (torch.randint(0, 40, (2, 8)),))


class _Seq2Seq(nn.Module):
    """nn.Transformer, one encoder and one decoder layer: pre-norm (``norm_first``, with
    final norms) or post-norm (the original Transformer's ``norm(x + f(x))``)."""

    def __init__(self, norm_first: bool, d: int = 32) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, d)
        self.t = nn.Transformer(d, 2, 1, 1, 2 * d, dropout=0.0, batch_first=True,
                                norm_first=norm_first)
        self.head = nn.Linear(d, 40, bias=False)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        return self.head(self.t(self.emb(src), self.emb(tgt)))


@pytest.mark.parametrize("norm_first", [True, False])
def test_post_norm_is_per_stream(norm_first: bool) -> None:
    """An encoder's last add feeds only its final norm, as a pre-norm stack's last add
    does: pre-norm, though not the last add of the model (rules §4, Post-norm blocks).
    Post-norm, every add but each stream's last (which ends in a norm either way) is;
    its numbers are at unit scale (§8)."""
    torch.manual_seed(0)
    ids = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = umup_fx.transform(_Seq2Seq(norm_first), (ids, ids))
    warned = {w.category for w in caught}
    branches = model.umup_plan.branches
    assert [b.stream for b in branches] == [0, 0, 1, 1, 1]
    post = [False] * 5 if norm_first else [True, False, True, True, False]
    assert [b.post_norm for b in branches] == post
    assert (umup_fx.PostNormWarning in warned) == (not norm_first)
    assert umup_fx.ScaleWarning not in warned


def test_cross_attention_output_at_long_sequences_is_flagged() -> None:
    """What the rules do not cover stays loud (rules §8, "Open"): at 128 positions the
    cross-attention's output grows with what the encoder's positions share, and the
    check names it; the bands' row coherence and key spread do not hide a forward."""
    torch.manual_seed(0)
    ids = torch.randint(0, 40, (2, 128), generator=torch.Generator().manual_seed(1))
    model = umup_fx.transform(_Seq2Seq(norm_first=False), (ids, ids), check=False)
    lines = umup_fx.check(model, (ids, ids)).lines()
    assert any("multihead_attn.out_proj" in line and ": output RMS" in line for line in lines)


def test_post_norm_add_scales_are_the_norms() -> None:
    """In ``norm(x + f(x))`` the norm undoes any scale of the add: u-muP's residual split /
    add followed by the norm equal, forward and backward, the norm of the plain sum with
    the branch weighted by tau (float64, PyTorch's own layer_norm as the truth), and the
    reference library's post-norm block (its residual_split / residual_add)."""
    from umup_fx.runtime import ops

    U = pytest.importorskip("unit_scaling.functional")
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 16, 32, dtype=torch.float64, generator=gen)
    w = torch.randn(32, 32, dtype=torch.float64, generator=gen) / 32**0.5
    g = torch.randn(4, 16, 32, dtype=torch.float64, generator=gen)
    tau, results = 0.5, []
    for lib in (ops, U, None):
        x = x0.clone().requires_grad_()
        if lib is None:
            y = x + tau * torch.tanh(x @ w)
        else:
            branch, skip = lib.residual_split(x, tau)
            y = lib.residual_add(torch.tanh(branch @ w), skip, tau)
        out = F.layer_norm(y, (32,), eps=0.0)
        (grad,) = torch.autograd.grad(out, x, g)
        results.append((out.detach(), grad))
    for other in results[1:]:
        torch.testing.assert_close(results[0][0], other[0])
        torch.testing.assert_close(results[0][1], other[1])


def test_a_crash_inside_a_pass_is_an_analysis_error(monkeypatch) -> None:
    from umup_fx import pipeline

    def broken(gm):
        for node in gm.graph.nodes:
            if node.op == "call_function" and "gelu" in str(node.target):
                raise IndexError("tuple index out of range")

    monkeypatch.setattr(pipeline, "analysis_passes", lambda roles=None: [broken])
    with pytest.raises(umup_fx.AnalysisError, match="broken pass failed on aten.gelu") as err:
        umup_fx.analyze(_Backbone(), (torch.randint(0, 40, (2, 8)),))
    assert "test_coverage.py" in str(err.value) and "IndexError" in str(err.value)  # the line


# -- real families, end to end ---------------------------------------------------------
@pytest.mark.parametrize("family", ["Gemma2", "Falcon", "GPT-J", "T5", "ViT (HF)", "CLIP text",
                                    "BERT"])
def test_family_transforms_with_unit_scale_at_init(family: str) -> None:
    pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = check(family)
    assert result.status == "ok", result.message
    assert not result.uncovered and result.step_finite
    assert result.unit_scale, {k: result.grad_rms[k] for k in result.low_grads()}
    if result.logits_rms is not None:
        assert result.logits_rms == pytest.approx(result.readout_fan_in**-0.5, rel=0.25)


def test_t5_streams_and_depth() -> None:
    pytest.importorskip("transformers")
    from tests.families import FAMILIES

    torch.manual_seed(0)
    case = FAMILIES["T5"]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = umup_fx.transform(case.model, case.args, case.kwargs).umup_plan
    encoder = [b for b in plan.branches if b.stream == 0]
    decoder = [b for b in plan.branches if b.stream == 1]
    assert [b.kind for b in encoder] == ["attention", "mlp"] * 2
    assert [b.kind for b in decoder] == ["attention", "attention", "mlp"] * 2  # + cross-attn
    assert plan.depth == 2
    assert encoder[0].tau == pytest.approx(2**-0.5) and decoder[0].tau == pytest.approx(3**-0.5)


# -- the fuzzer --------------------------------------------------------------------------
_FUZZ_ACTS = ["relu", "gelu", "silu", "tanh", "quick_gelu", "leaky_relu", "softplus"]


class _Random(nn.Module):
    """A random pre-norm stack over the supported ops, optionally with one unknown op."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__()
        self.d = rng.choice([32, 64])
        self.tokens = rng.random() < 0.5
        self.inp = nn.Embedding(50, self.d) if self.tokens else nn.Linear(12, self.d)
        self.kinds = [rng.choice(["mlp", "glu", "attn"]) for _ in range(rng.randint(1, 3))]
        self.acts = [rng.choice(_FUZZ_ACTS) for _ in self.kinds]
        self.norm = rng.choice(["layer", "rms", "hand"])  # hand: (x - mean) * rsqrt(var + eps)
        self.unknown = rng.random() < 0.25
        # forms of coverage II: a LayerScale gain, the model's own branch multiplier,
        # q pre-scaled for SDPA at scale=1 (each a rule of its own, docs/rules.md)
        self.layer_scale, self.branch_mult, self.q_scaled = (rng.random() < 0.3 for _ in range(3))
        self.gammas = nn.ParameterList(torch.full((self.d,), 1e-4) for _ in self.kinds)
        self.layers = nn.ModuleList()
        for kind in self.kinds:
            width = self.d * (3 if kind == "attn" else 4)
            self.layers.append(nn.ModuleDict({
                "a": nn.Linear(self.d, width), "g": nn.Linear(self.d, width),
                "o": nn.Linear(width // 3 if kind == "attn" else width, self.d),
            }))
        self.head = nn.Linear(self.d, 7)
        # a position table broadcast over the batch, added to the input (rules.md, "A
        # broadcast add"); drawn last so that the earlier draws keep their models
        self.pos_add = rng.random() < 0.5
        self.pos = nn.Embedding(12, self.d)

    def _act(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh,
                "quick_gelu": lambda t: t * torch.sigmoid(1.702 * t),
                "leaky_relu": F.leaky_relu, "softplus": F.softplus}[name](x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        if self.pos_add:
            x = x + self.pos(torch.arange(x.shape[1], device=x.device))
        for i, (kind, act, layer) in enumerate(zip(self.kinds, self.acts, self.layers, strict=True)):
            if self.norm == "hand":
                mu = x.mean(-1, keepdim=True)
                h = (x - mu) * torch.rsqrt((x - mu).pow(2).mean(-1, keepdim=True) + 1e-5)
            else:
                h = F.layer_norm(x, (self.d,)) if self.norm == "layer" else F.rms_norm(x, (self.d,))
            if kind == "attn":
                b, s, _ = h.shape
                q, k, v = layer["a"](h).view(b, s, 3, 4, -1).unbind(2)
                scale = None
                if self.q_scaled:
                    q, scale = q * q.shape[-1] ** -0.5, 1.0
                h = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)),
                                                   is_causal=True, scale=scale)
                h = h.transpose(1, 2).reshape(b, s, -1)
            elif kind == "glu":
                h = self._act(act, layer["a"](h)) * layer["g"](h)
            else:
                h = self._act(act, layer["a"](h))
            if self.unknown:
                h = torch.sin(h)
            branch = layer["o"](h)
            if self.branch_mult:
                branch = branch * 0.3
            if self.layer_scale:
                branch = self.gammas[i] * branch
            x = x + branch
        return self.head(F.layer_norm(x, (self.d,)))


@pytest.mark.parametrize("seed", range(12))
def test_fuzz_unit_scale_or_a_clear_error(seed: int) -> None:
    """Random stacks: a transform with unit-scale gradients at init, unknown ops listed
    (never silently scaled), or an UmupError; no other exception."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model = _Random(rng)
    x = torch.randint(0, 50, (4, 12)) if model.tokens else torch.randn(4, 12, 12)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model = umup_fx.transform(model, (x,))
        except umup_fx.UmupError:
            return
    uncovered = [w for w in caught if w.category is umup_fx.UncoveredOpWarning]
    assert bool(uncovered) == model.unknown
    if model.unknown:
        assert "sin" in str(uncovered[0].message)
        return
    assert not [w for w in caught if w.category is umup_fx.ScaleWarning], model.kinds
    # the position add: a sum of tables after a token lookup, else a broadcast plain add
    # with the table's gradient brought back
    target = ops.add_tables if model.tokens else ops.add
    broadcast = [n for n in graph_nodes(model) if n.target is target and n.kwargs]
    assert len(broadcast) == model.pos_add
    # every weight op's output, output gradient and weight gradient in its band, with the
    # gradient a loss sends the returned logits (rules §8)
    report = umup_fx.check(model, (x,))
    assert report.ok, (model.kinds, model.acts, report.lines()[:4])
