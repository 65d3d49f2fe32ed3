"""umup_fx.runtime.ops: exact-moment activations / gated units, conv and averages (unit scaling, App. B)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx.experimental.proxy_tensor import make_fx

from umup_fx.runtime import ops
from umup_fx.runtime.ops import activations, linears

KINDS = sorted(activations._ACTIVATIONS)
N = 1_000_000


def _randn(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _plain(kind: str, mult: float, kw: dict[str, Any]) -> Callable[[Tensor], Tensor]:
    """f(mult x)/mult, written out independently of activations._apply."""
    fn = activations._ACTIVATIONS[kind][0]
    return lambda x: fn(x * mult, **kw) / mult


def _grads(
    fn: Callable[..., Tensor], *inputs: Tensor, seed: int = 1
) -> tuple[Tensor, list[Tensor]]:
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(_randn(*out.shape, seed=seed))
    return out.detach(), [t.grad for t in leaves]  # type: ignore[misc]


# -- constants -------------------------------------------------------------------------
def test_known_constants() -> None:
    assert ops.activation_scale("relu") == pytest.approx(((1 - 1 / math.pi) / 2) ** -0.5, rel=1e-7)
    assert ops.activation_scale("relu", gated=True) == pytest.approx(2**0.5, rel=1e-7)
    assert 1 / ops.activation_scale("tanh") == pytest.approx(0.6279, abs=2e-4)
    # relu2: E[relu^4] = 3/2, E[relu^2] = 1/2 -> var 5/4; gated E[f^2] = 3/2.
    assert ops.activation_scale("relu2") == pytest.approx(1.25**-0.5, rel=1e-7)
    assert ops.activation_scale("relu2", gated=True) == pytest.approx(1.5**-0.5, rel=1e-7)
    # sigmoid: centred (its mean 1/2 is not counted), so far from the RMS scale.
    assert ops.activation_scale("sigmoid") > 4 > ops.activation_scale("sigmoid", gated=True)
    # The exact silu scale is near, but not equal to, the reference's empirical interp model.
    interp = activations._act_scales(1.0, 0.5, True)[0]
    exact = ops.activation_scale("silu")
    assert exact == pytest.approx(interp, rel=0.02) and exact != pytest.approx(interp, rel=1e-3)
    assert isinstance(exact, float)


def test_bad_arguments() -> None:
    x = _randn(8)
    with pytest.raises(ValueError, match="unknown activation kind"):
        ops.activation(x, "swish")
    with pytest.raises(ValueError, match="keyword arguments"):
        ops.activation(x, "relu", negative_slope=0.1)
    with pytest.raises(ValueError, match="non-zero"):
        ops.activation(x, "relu", mult=0.0)
    # A symbolic mult (SymFloat under symbolic tracing) has no value to integrate with.
    with pytest.raises(ValueError, match="concrete Python number"):
        make_fx(lambda t: ops.activation(t, "relu", mult=t.shape[0] / 3), tracing_mode="symbolic")(
            x
        )


# -- activation / glu --------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_activation_unit_std_and_tied_grad(kind: str) -> None:
    x = _randn(N)
    kw: dict[str, Any] = {"negative_slope": 0.2} if kind == "leaky_relu" else {}
    out, (gx,) = _grads(lambda t: ops.activation(t, kind, **kw), x)
    assert out.std().item() == pytest.approx(1.0, rel=0.02)
    s = ops.activation_scale(kind, **kw)
    ref_out, (ref_gx,) = _grads(_plain(kind, 1.0, kw), x)
    torch.testing.assert_close(out, ref_out * s)
    torch.testing.assert_close(gx, ref_gx * s)


@pytest.mark.parametrize(
    ("kind", "mult", "kw"),
    [
        ("gelu", 2.0, {"approximate": "tanh"}),
        ("silu", 0.5, {}),
        ("softplus", 1.5, {"beta": 2.0}),
        ("elu", 3.0, {"alpha": 0.5}),
        ("relu2", 0.25, {}),
    ],
)
def test_activation_mult(kind: str, mult: float, kw: dict[str, Any]) -> None:
    x = _randn(N, seed=2)
    out, (gx,) = _grads(lambda t: ops.activation(t, kind, mult=mult, **kw), x)
    assert out.std().item() == pytest.approx(1.0, rel=0.02)
    s = ops.activation_scale(kind, mult=mult, **kw)
    ref_out, (ref_gx,) = _grads(_plain(kind, mult, kw), x)
    torch.testing.assert_close(out, ref_out * s)
    torch.testing.assert_close(gx, ref_gx * s)


@pytest.mark.parametrize("kind", ["relu", "gelu", "silu", "tanh"])
@pytest.mark.parametrize("mult", [1.0, 2.0])
def test_glu_unit_rms_and_tied_grads(kind: str, mult: float) -> None:
    up, gate = _randn(N, seed=3), _randn(N, seed=4)
    out, (g_up, g_gate) = _grads(lambda u, g: ops.glu(u, g, kind, mult=mult), up, gate)
    assert out.square().mean().sqrt().item() == pytest.approx(1.0, rel=0.02)
    s = ops.activation_scale(kind, mult=mult, gated=True)
    f = _plain(kind, mult, {})
    ref_out, (ref_up, ref_gate) = _grads(lambda u, g: u * f(g), up, gate)
    torch.testing.assert_close(out, ref_out * s)
    torch.testing.assert_close(g_up, ref_up * s)
    torch.testing.assert_close(g_gate, ref_gate * s)


def test_compile_with_cache_miss_while_tracing() -> None:
    # Clear the cache so the integration runs while Dynamo traces (fresh kinds and mults too).
    activations._gaussian_scale_cached.cache_clear()
    x, y = _randn(64, seed=5), _randn(64, seed=6)

    def fn(a: Tensor, b: Tensor) -> Tensor:
        return ops.activation(a, "mish", mult=1.37) + ops.glu(a, b, "hardswish", mult=0.61)

    compiled = torch.compile(fn, backend="eager", fullgraph=True)
    out = compiled(x, y)
    assert activations._gaussian_scale_cached.cache_info().currsize == 2
    torch.testing.assert_close(out, fn(x, y))
    # Gradients through AOTAutograd (fake + functional modes active), another fresh key.
    activations._gaussian_scale_cached.cache_clear()

    def fn2(a: Tensor) -> Tensor:
        return ops.activation(a, "softplus", mult=0.83, beta=2.0)

    _, (g_compiled,) = _grads(torch.compile(fn2, backend="aot_eager", fullgraph=True), x)
    _, (g_eager,) = _grads(fn2, x)
    torch.testing.assert_close(g_compiled, g_eager)
    # make_fx (proxy mode): the integration must not be recorded into the graph.
    activations._gaussian_scale_cached.cache_clear()
    gm = make_fx(lambda t: ops.activation(t, "quick_gelu", mult=1.9))(x)
    assert not any("linspace" in str(n.target) for n in gm.graph.nodes)
    torch.testing.assert_close(gm(x), ops.activation(x, "quick_gelu", mult=1.9))


# -- conv --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("x_shape", "w_shape", "kwargs"),
    [
        ((2, 3, 11, 13), (5, 3, 3, 3), {"stride": 2, "padding": 1}),
        ((4, 6, 17), (8, 3, 5), {"padding": "same", "dilation": 2, "groups": 2}),
        ((3, 9, 20), (4, 9, 4), {"padding": "valid", "stride": 3}),
        ((2, 10, 12), (4, 2, 3, 2), {"padding": (1, 0), "stride": (1, 2)}),  # unbatched 2-D
        ((2, 2, 5, 6, 7), (3, 2, 2, 3, 3), {"stride": (2, 1, 2), "padding": (0, 1, 1)}),
    ],
)
def test_conv(x_shape: tuple[int, ...], w_shape: tuple[int, ...], kwargs: dict[str, Any]) -> None:
    x, w, b = _randn(*x_shape, seed=7), _randn(*w_shape, seed=8), _randn(w_shape[0], seed=9)
    conv_fn = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[len(w_shape)]
    fan_in = w_shape[1] * math.prod(w_shape[2:])
    out_scale, grad_input_scale = ops.hidden_linear_scales(fan_in)
    out, (gx, gw, gb) = _grads(
        lambda a, c, d: ops.conv(
            a, c, d, **kwargs, out_scale=out_scale, grad_input_scale=grad_input_scale
        ),
        x,
        w,
        b,
    )
    ref_out, (ref_gx, ref_gw, ref_gb) = _grads(lambda a, c, d: conv_fn(a, c, d, **kwargs), x, w, b)
    torch.testing.assert_close(out, conv_fn(x, w * out_scale, b * out_scale, **kwargs))
    # rows: every output position of every batch element (out.numel() / C_out).
    rows = out.numel() // w_shape[0]
    geometry = (kwargs.get(k, d) for k, d in (("stride", 1), ("padding", 0), ("dilation", 1)))
    assert linears._conv_rows(x, w, *geometry) == rows
    torch.testing.assert_close(gw, ref_gw * rows**-0.5)
    torch.testing.assert_close(gb, ref_gb * rows**-0.5)
    torch.testing.assert_close(gx, ref_gx * grad_input_scale)


# -- averages ----------------------------------------------------------------------------
def test_mean_over_keeps_value_and_scales_grad_by_sqrt_n() -> None:
    """Forward 1 (a shared mean survives averaging), backward x sqrt(n): docs/rules.md §3."""
    x = _randn(16, 16, 64, 64, seed=10)  # 4x4 windows -> n = 16
    out, (gx,) = _grads(lambda t: ops.mean_over(t, "adaptive_avg_pool2d", (16, 16)), x)
    ref_out, (ref_gx,) = _grads(lambda t: F.adaptive_avg_pool2d(t, (16, 16)), x)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(gx, ref_gx * 4)
    relu = F.relu(x) + 0.0  # a shared positive mean, as conv features after ReLU
    pooled = ops.mean_over(relu, "adaptive_avg_pool2d", 1)
    assert pooled.pow(2).mean().sqrt() <= relu.pow(2).mean().sqrt()


@pytest.mark.parametrize(("shared_mean", "expected"), [(1.0, 1.0), (0.0, 49**-0.5)])
def test_mean_over_weight_grads_below_a_pool(shared_mean: float, expected: float) -> None:
    """A linear per position, then a mean over n = 49 positions. Positions sharing a mean
    (as conv features do) give unit weight gradients; independent zero-mean ones give
    n^-1/2: the two regimes docs/rules.md §3 (pooling) describes."""
    w = _randn(32, 32, seed=13).requires_grad_()
    x = _randn(64, 49, 32, seed=14) * 0.1 + shared_mean if shared_mean else _randn(64, 49, 32)
    h = ops.linear(x, w, out_scale=32**-0.5, grad_input_scale=32**-0.5)
    pooled = ops.mean_over(h, "mean", [1], False)
    pooled.backward(_randn(*pooled.shape, seed=15))
    assert w.grad.pow(2).mean().sqrt().item() == pytest.approx(expected, rel=0.1)


def test_mean_over_mean_and_avg_pool() -> None:
    x = _randn(64, 8, 32, seed=11)
    _, (gx,) = _grads(lambda t: ops.mean_over(t, "mean", [1, 2], False), x)
    _, (ref,) = _grads(lambda t: t.mean((1, 2)), x)
    torch.testing.assert_close(gx, ref * 256**0.5)
    torch.testing.assert_close(ops.mean_over(x, "mean", [1, 2], False), x.mean((1, 2)))
    y = _randn(8, 4, 30, seed=12)
    _, (gy,) = _grads(lambda t: ops.mean_over(t, "avg_pool1d", 3, 3, 0, False, True), y)
    _, (ref,) = _grads(lambda t: F.avg_pool1d(t, 3, stride=3), y)
    torch.testing.assert_close(gy, ref * 3**0.5)


def test_max_pool_keeps_value_and_brings_grads_back_to_unit() -> None:
    x = _randn(16, 8, 32, 32, seed=16)
    out, (gx,) = _grads(lambda t: ops.max_pool(t, "max_pool2d", 2), x)
    ref_out, (ref_gx,) = _grads(lambda t: F.max_pool2d(t, 2), x)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(gx, ref_gx * 2)  # sqrt(2 * 2): one input in four
    assert gx.pow(2).mean().sqrt().item() == pytest.approx(1.0, rel=0.02)
