"""umup_fx.runtime.ops against the reference library (unit-scaling 0.3.5) and the rules (§3)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import pytest
import torch
import torch.nn.functional as F
import unit_scaling.functional as U
from torch import Tensor
from torch._dynamo.testing import CompileCounterWithBackend
from unit_scaling.core.functional import logarithmic_interpolation
from unit_scaling.scale import scale_bwd as ref_scale_bwd
from unit_scaling.scale import scale_fwd as ref_scale_fwd

from umup_fx.runtime import ops

MULTS = (0.5, 1.0, 2.0)


def _randn(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _fwd_bwd(fn: Callable[..., Tensor], inputs: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """fn's output and the grads of its floating-point inputs for a fixed random upstream grad."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*leaves)
    out.backward(_randn(*out.shape, seed=123))
    return out.detach(), [t.grad for t in leaves if t.requires_grad]


def _same(
    ours: Callable[..., Tensor],
    ref: Callable[..., Tensor],
    inputs: Sequence[Tensor],
    rtol: float = 1e-5,
    atol: float = 1e-6,
) -> None:
    """Forward values and every input gradient agree."""
    out, grads = _fwd_bwd(ours, inputs)
    ref_out, ref_grads = _fwd_bwd(ref, inputs)
    torch.testing.assert_close(out, ref_out, rtol=rtol, atol=atol)
    assert len(grads) == len(ref_grads)
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, rtol=rtol, atol=atol)


def _rms(t: Tensor) -> float:
    return t.pow(2).mean().sqrt().item()


# -- primitives --------------------------------------------------------------------------
def test_scale_fwd_and_bwd() -> None:
    x = _randn(4, 5)
    out, (g,) = _fwd_bwd(lambda t: ops.scale_fwd(t, 0.3), [x])
    torch.testing.assert_close(out, x * 0.3)
    torch.testing.assert_close(g, _randn(4, 5, seed=123))  # gradient untouched

    out, (g,) = _fwd_bwd(lambda t: ops.scale_bwd(t, 0.3), [x])
    assert torch.equal(out, x)  # bit-exact identity
    torch.testing.assert_close(g, _randn(4, 5, seed=123) * 0.3)

    both, (g,) = _fwd_bwd(lambda t: ops.scale_bwd(ops.scale_fwd(t, 2.0), 0.25), [x])
    torch.testing.assert_close(both, 2 * x)
    torch.testing.assert_close(g, _randn(4, 5, seed=123) * 0.25)


def test_scale_bwd_is_exact_identity_for_awkward_values() -> None:
    x = torch.tensor([0.0, -0.0, 1e-38, -3.4e38, float("inf"), float("nan"), 1 / 3])
    x.requires_grad_()
    y = ops.scale_bwd(x, 0.1)
    assert y.data_ptr() == x.data_ptr()  # no copy, no multiply
    assert torch.equal(y.detach().view(torch.int32), x.detach().view(torch.int32))


def test_scale_one_is_skipped_and_no_grad_path() -> None:
    x = _randn(3)
    assert ops.scale_fwd(x, 1.0) is x
    assert ops.scale_bwd(x, 0.5) is x  # nothing needs a gradient
    with torch.no_grad():
        xr = x.clone().requires_grad_()
        torch.testing.assert_close(ops.scale_fwd(xr, 3.0), x * 3)


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5, 1.0])
def test_log_interp(alpha: float) -> None:
    for lower, upper in [(2.0, 2**0.5), (1e-3, 1e-1), (64.0, 8.0)]:
        want = math.exp(alpha * math.log(upper) + (1 - alpha) * math.log(lower))
        assert ops.log_interp(alpha, lower, upper) == pytest.approx(want, rel=1e-12)
        assert want == pytest.approx(logarithmic_interpolation(alpha, lower, upper), rel=1e-12)


# -- linear / embedding / norms --------------------------------------------------------
@pytest.mark.parametrize("shape,fan_out,bias", [((4, 8, 16), 32, True), ((64, 32), 16, False)])
def test_hidden_linear_matches_reference(shape: tuple[int, ...], fan_out: int, bias: bool) -> None:
    fan_in = shape[-1]
    out_s, gin_s = ops.hidden_linear_scales(fan_in)
    assert out_s == gin_s == fan_in**-0.5
    inputs = [_randn(*shape, seed=1), _randn(fan_out, fan_in, seed=2)]
    if bias:
        inputs.append(_randn(fan_out, seed=3))

    def ours(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
        return ops.linear(x, w, b, out_scale=out_s, grad_input_scale=gin_s)

    def ref(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
        return U.linear(x, w, b)  # default constraint: to_output_scale

    _same(ours, ref, inputs)


@pytest.mark.parametrize("mult", MULTS)
def test_readout_linear_matches_reference(mult: float) -> None:
    fan_in, fan_out = 32, 48
    out_s, gin_s = ops.readout_linear_scales(fan_in, fan_out, mult)
    assert (out_s, gin_s) == (mult / fan_in, fan_out**-0.5)
    inputs = [
        _randn(3, 5, fan_in, seed=1),
        _randn(fan_out, fan_in, seed=2),
        _randn(fan_out, seed=3),
    ]

    def ours(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        return ops.linear(x, w, b, out_scale=out_s, grad_input_scale=gin_s)

    def ref(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        # The reference readout has no alpha_out: it is a forward-only multiplier.
        return ref_scale_fwd(U.linear_readout(x, w, b), mult)

    _same(ours, ref, inputs)


def test_linear_weight_transposed() -> None:
    """HF Conv1D layout: weight stored [in, out], bias added as in addmm(b, x, W)."""
    fan_in, fan_out = 16, 24
    inputs = [
        _randn(2, 7, fan_in, seed=1),
        _randn(fan_in, fan_out, seed=2),
        _randn(fan_out, seed=3),
    ]
    s = fan_in**-0.5

    def ours(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        return ops.linear(x, w, b, out_scale=s, grad_input_scale=s, weight_transposed=True)

    def ref(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        return U.linear(x, w.t(), b)

    _same(ours, ref, inputs)


def test_linear_bias_inside_forward_scale() -> None:
    x, w, b = torch.zeros(6, 4), _randn(3, 4), _randn(3, seed=1)
    out, (_, _, gb) = _fwd_bwd(
        lambda x, w, b: ops.linear(x, w, b, out_scale=0.5, grad_input_scale=1.0), [x, w, b]
    )
    torch.testing.assert_close(out, (b * 0.5).expand(6, 3))
    torch.testing.assert_close(gb, _randn(6, 3, seed=123).sum(0) * 6**-0.5)


@pytest.mark.parametrize("padding_idx", [None, 0])
def test_embedding_matches_reference(padding_idx: int | None) -> None:
    idx = torch.randint(0, 50, (4, 9), generator=torch.Generator().manual_seed(0))
    w = _randn(50, 8, seed=1)
    _same(
        lambda w: ops.embedding(idx, w, padding_idx),
        lambda w: U.embedding(idx, w, padding_idx),
        [w],
    )


def test_layer_norm_matches_reference() -> None:
    x, w, b = _randn(3, 5, 16), _randn(16, seed=1), _randn(16, seed=2)
    _same(
        lambda x, w, b: ops.layer_norm(x, (16,), w, b),
        lambda x, w, b: U.layer_norm(x, (16,), w, b),
        [x, w, b],
    )
    _same(lambda x: ops.layer_norm(x, [16]), lambda x: U.layer_norm(x, [16]), [x])


def test_rms_norm_matches_reference() -> None:
    x, w = _randn(3, 5, 16), _randn(16, seed=1)
    _same(
        lambda x, w: ops.rms_norm(x, (16,), w, eps=1e-5),
        lambda x, w: U.rms_norm(x, (16,), w, eps=1e-5),
        [x, w],
    )
    _same(lambda x: ops.rms_norm(x, (16,), eps=1e-5), lambda x: U.rms_norm(x, (16,)), [x])


def test_param_grad_scale() -> None:
    w, act = _randn(16), torch.empty(4, 8, 16)
    _, (g,) = _fwd_bwd(lambda w: ops.param_grad_scale(w, act), [w])
    torch.testing.assert_close(g, _randn(16, seed=123) * (16 / act.numel()) ** 0.5)


# -- residuals and adds ----------------------------------------------------------------
@pytest.mark.parametrize("tau", [0.3, 1.0, 2**-0.5])
def test_residual_matches_reference(tau: float) -> None:
    def block(split: Callable, add: Callable, x: Tensor, w: Tensor) -> Tensor:
        branch, skip = split(x, tau)
        return add(torch.tanh(branch @ w), skip, tau)

    inputs = [_randn(6, 8), _randn(8, 8, seed=1)]
    _same(
        lambda x, w: block(ops.residual_split, ops.residual_add, x, w),
        lambda x, w: block(U.residual_split, U.residual_add, x, w),
        inputs,
    )


def test_residual_rule_numbers() -> None:
    tau = 0.5
    d = (1 + tau**2) ** 0.5
    x = _randn(5)
    _, (g,) = _fwd_bwd(lambda x: ops.residual_split(x, tau)[0], [x])
    torch.testing.assert_close(g, _randn(5, seed=123) * tau / d)
    _, (g,) = _fwd_bwd(lambda x: ops.residual_split(x, tau)[1], [x])
    torch.testing.assert_close(g, _randn(5, seed=123) / d)
    f, s = _randn(5, seed=1), _randn(5, seed=2)
    torch.testing.assert_close(ops.residual_add(f, s, tau), (tau * f + s) / d)


@pytest.mark.parametrize("shape_a,shape_b", [((4, 6), (4, 6)), ((4, 6), (6,)), ((3, 1, 5), (4, 5))])
def test_add_matches_reference(shape_a: tuple[int, ...], shape_b: tuple[int, ...]) -> None:
    _same(ops.add, U.add, [_randn(*shape_a, seed=1), _randn(*shape_b, seed=2)])


def test_add_scalars_unscaled_like_reference() -> None:
    a = _randn(4, 6)
    _same(lambda a: ops.add(a, 2.5), lambda a: U.add(a, 2.5), [a])
    _same(ops.add, U.add, [a, torch.tensor(1.5)])
    torch.testing.assert_close(ops.add(a, a), 2 * a * 2**-0.5)


# -- attention and softmax -------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mult", MULTS)
def test_sdpa_matches_reference(causal: bool, mult: float) -> None:
    q, k, v = (_randn(2, 3, 10, 8, seed=i) for i in range(3))
    _same(
        lambda q, k, v: ops.scaled_dot_product_attention(q, k, v, is_causal=causal, mult=mult),
        lambda q, k, v: U.scaled_dot_product_attention(q, k, v, is_causal=causal, mult=mult),
        [q, k, v],
    )


def test_sdpa_cross_attention_mask_and_dropout_match_reference() -> None:
    # Query length 5, key length 12: the reference's S is the key/value length.
    q, k, v = _randn(2, 2, 5, 8, seed=0), _randn(2, 2, 12, 8, seed=1), _randn(2, 2, 12, 8, seed=2)
    mask = _randn(5, 12, seed=3) > -0.5
    _same(
        lambda q, k, v: ops.scaled_dot_product_attention(q, k, v, mask, mult=2.0),
        lambda q, k, v: U.scaled_dot_product_attention(q, k, v, mask, mult=2.0),
        [q, k, v],
    )

    def seeded(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        def run(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            torch.manual_seed(7)  # same dropout mask for both
            return fn(q, k, v, dropout_p=0.2, is_causal=True)

        return run

    q = _randn(2, 2, 12, 8, seed=0)
    _same(
        seeded(ops.scaled_dot_product_attention), seeded(U.scaled_dot_product_attention), [q, k, v]
    )


def test_attention_scales_numbers() -> None:
    # docs/reference-differences.md: d_head 16, S 16, causal -> s = 2.370072.
    logit, s = ops.attention_scales(16, 16, causal=True)
    assert logit == 1 / 16
    assert s == pytest.approx(2.370072, abs=1e-6)
    alpha = 1 / (1 + 4 * 64 / 2.0**2)
    lower = (1 / 100) ** 0.5
    want = 0.9**0.5 / math.exp((1 - alpha) * math.log(lower))
    assert ops.attention_scales(64, 100, causal=False, mult=2.0, dropout_p=0.1) == pytest.approx(
        (2.0 / 64, want), rel=1e-12
    )
    assert ops.attention_scales(8, 1, causal=True)[1] == pytest.approx(1.0)  # one key: v


def test_sdpa_gqa() -> None:
    q, k, v = _randn(2, 4, 6, 8, seed=0), _randn(2, 2, 6, 8, seed=1), _randn(2, 2, 6, 8, seed=2)

    def ours(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return ops.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def repeated(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        k, v = (t.repeat_interleave(2, dim=1) for t in (k, v))
        return ops.scaled_dot_product_attention(q, k, v, is_causal=True)

    _same(ours, repeated, [q, k, v])


@pytest.mark.parametrize("mult", MULTS)
@pytest.mark.parametrize("dim", [-1, 1])
def test_softmax_matches_reference(mult: float, dim: int) -> None:
    x = _randn(3, 7, 20)
    _same(lambda x: ops.softmax(x, dim, mult=mult), lambda x: U.softmax(x, dim, mult=mult), [x])
    _same(
        lambda x: ops.softmax(x, dim, mult=mult, tied=False),
        lambda x: U.softmax(x, dim, mult=mult, constraint=None),
        [x],
    )


# -- activations -----------------------------------------------------------------------
@pytest.mark.parametrize("mult", MULTS)
def test_silu_gelu_match_reference(mult: float) -> None:
    x = _randn(4, 33)
    for tied, constraint in [(True, "to_output_scale"), (False, None)]:
        _same(
            partial(ops.silu, mult=mult, tied=tied),
            partial(U.silu, mult=mult, constraint=constraint),
            [x],
        )
        for approximate in ("none", "tanh"):
            _same(
                partial(ops.gelu, mult=mult, approximate=approximate, tied=tied),
                partial(U.gelu, mult=mult, approximate=approximate, constraint=constraint),
                [x],
            )


@pytest.mark.parametrize("mult", MULTS)
def test_silu_glu_matches_reference(mult: float) -> None:
    _same(
        lambda u, g: ops.silu_glu(u, g, mult=mult),
        lambda u, g: U.silu_glu(u, g, mult=mult),
        [_randn(5, 24, seed=1), _randn(5, 24, seed=2)],
    )


@pytest.mark.parametrize("training", [True, False])
def test_dropout_matches_reference(training: bool) -> None:
    def seeded(fn: Callable[..., Tensor]) -> Callable[[Tensor], Tensor]:
        def run(x: Tensor) -> Tensor:
            torch.manual_seed(3)
            return fn(x, 0.25, training)

        return run

    _same(seeded(ops.dropout), seeded(U.dropout), [_randn(8, 16)])


@pytest.mark.parametrize("shape_a,shape_b", [((6, 10), (10, 4)), ((2, 3, 6, 10), (2, 3, 10, 5))])
def test_matmul_matches_reference(shape_a: tuple[int, ...], shape_b: tuple[int, ...]) -> None:
    inputs = [_randn(*shape_a, seed=1), _randn(*shape_b, seed=2)]
    _same(ops.matmul, U.matmul, inputs)
    _same(
        lambda a, b: ops.matmul(a, b, tied=False),
        lambda a, b: U.matmul(a, b, constraint=None),
        inputs,
    )


# -- loss ------------------------------------------------------------------------------
@pytest.mark.parametrize("mult", MULTS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_matches_reference(mult: float, reduction: str) -> None:
    logits = _randn(12, 40)
    target = torch.randint(0, 40, (12,), generator=torch.Generator().manual_seed(1))
    # At the reference size (reference_rows = the 12 rows here) ours is the library's.
    _same(
        lambda x: ops.cross_entropy(x, target, mult=mult, reduction=reduction, reference_rows=12),
        lambda x: U.cross_entropy(x, target, mult=mult, reduction=reduction),
        [logits],
    )

    def smoothed_ref(x: Tensor) -> Tensor:
        # U.cross_entropy refuses label_smoothing: its own recipe, written out.
        x = ref_scale_fwd(ref_scale_bwd(x, 40 / 39**0.5), mult)
        loss = F.cross_entropy(x, target, reduction="sum", label_smoothing=0.1)
        return ref_scale_fwd(loss, 1 / 12) if reduction == "mean" else loss

    _same(
        lambda x: ops.cross_entropy(x, target, mult=mult, reduction=reduction, label_smoothing=0.1,
                                    reference_rows=12),
        smoothed_ref,
        [logits],
    )


def test_cross_entropy_rule_numbers_and_ignore_index() -> None:
    v = 40
    logits = _randn(12, v).requires_grad_()
    target = torch.randint(0, v, (12,), generator=torch.Generator().manual_seed(1))
    target[:3] = -100
    loss = ops.cross_entropy(logits, target, reference_rows=12)
    loss.backward()
    # Value: PyTorch's mean over the 9 counted rows (the reference divides by all 12).
    torch.testing.assert_close(loss, F.cross_entropy(logits.detach(), target))
    ref = U.cross_entropy(logits.detach(), target)
    torch.testing.assert_close(ref, loss.detach() * 9 / 12)
    # Gradient: the mean's (softmax - onehot) / 9 on counted rows, * V / sqrt(V - 1) and
    # the 12 reference rows; the library (a sum) has 12/9 less when targets are ignored.
    want = torch.softmax(logits.detach(), -1) - F.one_hot(target.clamp(min=0), v)
    want[:3] = 0
    torch.testing.assert_close(logits.grad, want * v / (v - 1) ** 0.5 * 12 / 9)
    ref_logits = logits.detach().clone().requires_grad_()
    U.cross_entropy(ref_logits, target).backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad * 12 / 9)
    # Outside a model (no reference rows) the backward is F.cross_entropy's.
    outside = logits.detach().clone().requires_grad_()
    ops.cross_entropy(outside, target).backward()
    plain = logits.detach().clone().requires_grad_()
    F.cross_entropy(plain, target).backward()
    torch.testing.assert_close(outside.grad, plain.grad)


def test_reference_sizes_fix_the_scales() -> None:
    """With reference sizes, the scales are those of the reference call at any size."""
    x, w, g = _randn(8, 16), _randn(8, 16, seed=1), _randn(8, 8, seed=2)

    def weight_grad(rows_of: slice, rows: int | None) -> Tensor:
        wl = w.clone().requires_grad_()
        ops.linear(x[rows_of], wl, out_scale=0.25, grad_input_scale=0.25, rows=rows).backward(
            g[rows_of]
        )
        return wl.grad

    # 8 rows at reference 4: the sum of both halves' gradients, each at its own 4 rows.
    torch.testing.assert_close(
        weight_grad(slice(0, 8), 4), weight_grad(slice(0, 4), None) + weight_grad(slice(4, 8), None)
    )
    # Causal attention at reference length 8: the first 8 positions of 16 equal those of 8.
    q, k, v = (_randn(1, 2, 16, 4, seed=i) for i in range(3))
    short = ops.scaled_dot_product_attention(q[..., :8, :], k[..., :8, :], v[..., :8, :],
                                             is_causal=True, seq_len=8)
    long = ops.scaled_dot_product_attention(q, k, v, is_causal=True, seq_len=8)
    torch.testing.assert_close(long[..., :8, :], short, rtol=1e-6, atol=1e-6)


# -- unit scale at init ----------------------------------------------------------------
def test_hidden_linear_is_unit_scaled() -> None:
    fan_in, fan_out, batch = 256, 256, 512
    x = _randn(batch, fan_in, seed=1).requires_grad_()
    w = _randn(fan_out, fan_in, seed=2).requires_grad_()
    out_s, gin_s = ops.hidden_linear_scales(fan_in)
    y = ops.linear(x, w, out_scale=out_s, grad_input_scale=gin_s)
    y.backward(_randn(batch, fan_out, seed=3))
    for t in (y, x.grad, w.grad):
        assert 0.8 <= _rms(t) <= 1.25


def test_other_ops_are_unit_scaled() -> None:
    x = _randn(8, 4, 64, 32).requires_grad_()
    y = ops.scaled_dot_product_attention(x, x, x, is_causal=True)
    assert 0.5 <= _rms(y) <= 2
    for fn in (ops.silu, ops.gelu, lambda t: ops.silu_glu(t, t.flip(-1))):
        z = _randn(512, 256).requires_grad_()
        out = fn(z)
        out.backward(_randn(*out.shape, seed=1))
        assert 0.5 <= _rms(out) <= 2 and 0.5 <= _rms(z.grad) <= 2
    idx = torch.randint(0, 1000, (64, 64), generator=torch.Generator().manual_seed(0))
    w = _randn(1000, 128).requires_grad_()
    ops.embedding(idx, w).backward(_randn(64, 64, 128, seed=2))
    assert 0.5 <= _rms(w.grad) <= 2


# -- torch.compile ---------------------------------------------------------------------
def _compiled_matches_eager(
    fn: Callable[..., Tensor], input_sets: Sequence[Sequence[Tensor]], backend: str = "aot_eager"
) -> int:
    """Run fn compiled (fullgraph, dynamic) on every input set, compare with eager.

    Returns how many compiles the input sets after the first one caused (0: the graph
    is shape-generic, its scales stayed symbolic).
    """
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(fn, backend=counter, fullgraph=True, dynamic=True)
    first = None
    for inputs in input_sets:
        out, grads = _fwd_bwd(compiled, inputs)
        first = counter.frame_count if first is None else first
        ref_out, ref_grads = _fwd_bwd(fn, inputs)
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
        for g, rg in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, rg, rtol=1e-5, atol=1e-6)
    assert first
    return counter.frame_count - first


def test_compile_linear_dynamic_batch() -> None:
    def fn(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        return ops.linear(x, w, b, out_scale=0.25, grad_input_scale=0.25)

    sets = [[_randn(n, 5, 16, seed=n), _randn(8, 16), _randn(8)] for n in (2, 3, 6)]
    # One graph for every batch size: the B^-1/2 scale stays symbolic.
    assert _compiled_matches_eager(fn, sets) == 0


def test_compile_sdpa_dynamic_seq() -> None:
    def fn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return ops.scaled_dot_product_attention(q, k, v, is_causal=True, mult=2.0)

    sets = [[_randn(2, 2, s, 8, seed=s + i) for i in range(3)] for s in (5, 9, 17)]
    # One graph for every sequence length: ln S is traced symbolically.
    assert _compiled_matches_eager(fn, sets) == 0


def test_compile_residual_block() -> None:
    def fn(x: Tensor, w: Tensor) -> Tensor:
        branch, skip = ops.residual_split(x, 0.5)
        h = ops.rms_norm(branch, (16,), eps=1e-5)
        h = ops.linear(h, w, out_scale=0.25, grad_input_scale=0.25)
        h = ops.add(ops.silu_glu(h, h), ops.dropout(h, 0.0))
        return ops.residual_add(h, skip, 0.5)

    sets = [[_randn(n, 16, seed=n), _randn(16, 16)] for n in (3, 7)]
    assert _compiled_matches_eager(fn, sets) == 0


def test_compile_inductor_tiny_linear() -> None:
    torch._dynamo.reset()
    x, w = _randn(4, 8), _randn(6, 8, seed=1)

    def fn(x: Tensor, w: Tensor) -> Tensor:
        return ops.linear(x, w, out_scale=8**-0.5, grad_input_scale=8**-0.5)

    out, grads = _fwd_bwd(torch.compile(fn, fullgraph=True), [x, w])
    ref_out, ref_grads = _fwd_bwd(fn, [x, w])
    torch.testing.assert_close(out, ref_out)
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg)


def test_symbolic_trace_keeps_scales_symbolic() -> None:
    """AOTAutograd's path (make_fx, real SymInts) on a rewritten graph: one trace, any size."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def fn(q: Tensor, k: Tensor, v: Tensor, w: Tensor, g: Tensor) -> tuple[Tensor, ...]:
        h = ops.linear(q, w, out_scale=0.25, grad_input_scale=0.25)
        out = ops.scaled_dot_product_attention(h, k, v, is_causal=True, mult=2.0)
        return (out, *torch.autograd.grad(out, (q, k, v, w), g))

    def inputs(b: int, s: int) -> list[Tensor]:
        q, k, v = (_randn(b, 2, s, 8, seed=i).requires_grad_() for i in range(3))
        return [q, k, v, _randn(8, 8, seed=3).requires_grad_(), _randn(b, 2, s, 8, seed=4)]

    gm = make_fx(fn, tracing_mode="symbolic")(*inputs(2, 5))
    # A specialised batch or sequence length (B^-1/2, ln S) would break or change these.
    for b, s in ((3, 9), (2, 17)):
        ins = inputs(b, s)
        for got, want in zip(gm(*ins), fn(*ins), strict=True):
            torch.testing.assert_close(got, want)


def test_compile_cross_entropy_and_embedding() -> None:
    def fn(w: Tensor, idx: Tensor, target: Tensor) -> Tensor:
        h = ops.embedding(idx, w)
        logits = ops.linear(h, w, out_scale=1 / 8, grad_input_scale=20**-0.5)
        return ops.cross_entropy(logits.flatten(0, 1), target.flatten(), mult=2.0,
                                 reference_rows=12)

    gen = torch.Generator().manual_seed(0)
    sets = []
    for n in (3, 5):
        target = torch.randint(0, 20, (n, 6), generator=gen)
        target[0, :2] = -100
        sets.append([_randn(20, 8), torch.randint(0, 20, (n, 6), generator=gen), target])
    assert _compiled_matches_eager(fn, sets) == 0
