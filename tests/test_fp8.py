"""FP8 (rules §7) on the CPU: the simulated path, cast placement, saturation, training."""

from __future__ import annotations

import math

import pytest
import torch

import umup_fx
from examples.llama import Llama, LlamaConfig
from tests.tiny_models import graph_nodes, hf_llama
from umup_fx.runtime import fp8


def _llama(seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    return Llama(LlamaConfig(d_model=64, n_layers=2, n_heads=4))


def _batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (4, 32), generator=gen), torch.randint(0, 256, (4, 32), generator=gen)


def _fp8_weights(model: umup_fx.UmupModule) -> set[str]:
    return {
        umup_fx.meta.get(n, umup_fx.meta.WEIGHT)
        for n in graph_nodes(model)
        if n.target is fp8.linear
    }


def test_casts_on_qkv_and_gate_up_only_example_llama() -> None:
    model = umup_fx.transform(_llama(), _batch(), fp8="simulate")
    expected = {
        f"layers.{i}.{m}.weight"
        for i in range(2)
        for m in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
    }
    assert _fp8_weights(model) == expected
    assert "FP8 matmuls" in str(model.umup_plan) and "simulate" in str(model.umup_plan)


def test_casts_on_qkv_and_gate_up_only_hf_llama() -> None:
    pytest.importorskip("transformers")
    ids = _batch()[0]
    model = umup_fx.transform(hf_llama(hidden=64), (ids,), {"labels": ids}, fp8=True)
    names = _fp8_weights(model)
    assert len(names) == 10
    assert all(any(k in n for k in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")) for n in names)
    assert torch.isfinite(model(ids, labels=ids).loss)


def test_saturating_casts() -> None:
    x = torch.tensor([1e6, -1e6, 500.0, 1.0, float("inf"), 0.0])
    e4 = fp8.round_trip(x, fp8.E4M3)
    assert e4.tolist()[:4] == [448.0, -448.0, 448.0, 1.0] and e4[4] == 448.0
    e5 = fp8.round_trip(torch.tensor([1e9, -1e9]), fp8.E5M2)
    assert e5.tolist() == [57344.0, -57344.0]
    assert torch.isfinite(e4).all() and torch.isfinite(e5).all()


def test_simulated_linear_rounds_like_fp8() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 32, requires_grad=True)
    w = torch.randn(16, 32, requires_grad=True)
    y = fp8.linear(x, w, out_scale=1.0, grad_input_scale=1.0, mode="simulate")
    expected = fp8.round_trip(x, fp8.E4M3) @ fp8.round_trip(w, fp8.E4M3).t()
    torch.testing.assert_close(y, expected)
    g = torch.randn(8, 16)
    y.backward(g)
    g8 = fp8.round_trip(g, fp8.E5M2)
    torch.testing.assert_close(x.grad, g8 @ fp8.round_trip(w, fp8.E4M3).detach())
    torch.testing.assert_close(w.grad, (g8.t() @ fp8.round_trip(x, fp8.E4M3).detach()) * 8**-0.5)


def test_scaled_mm_mode_needs_hardware() -> None:
    if torch.cuda.is_available() and fp8.has_fp8_matmul(torch.device("cuda")):
        pytest.skip("this machine has FP8 matmuls")
    model = umup_fx.transform(_llama(), _batch(), fp8="scaled_mm")
    with pytest.raises(RuntimeError, match="sm_89"):
        model(*_batch())


def test_fp8_training_tracks_high_precision() -> None:
    losses = {}
    for mode in ("off", "simulate"):
        model = umup_fx.transform(_llama(), _batch(), fp8=mode)
        opt = umup_fx.AdamW(model, lr=2**-4)
        for step in range(20):
            opt.zero_grad()
            loss = model(*_batch(seed=100 + step % 4))
            loss.backward()
            opt.step()
            assert math.isfinite(loss.item())
        losses[mode] = loss.item()
    assert losses["simulate"] == pytest.approx(losses["off"], rel=0.02)
    assert losses["off"] < math.log(256) - 0.2  # it learns (random tokens: memorising)


def test_fp8_model_compiles_without_graph_breaks() -> None:
    model = umup_fx.transform(_llama(), _batch(), fp8=True)
    report = torch._dynamo.explain(model)(*_batch())
    assert report.graph_break_count == 0, report.break_reasons


def test_scaled_mm_path_equals_the_simulation() -> None:
    # torch._scaled_mm also runs on the CPU: the real path's operand layouts (row- and
    # column-major) and format pairs (E5M2 x E4M3 in the backward) are checked here.
    torch.manual_seed(0)
    x = torch.randn(32, 64)
    w = torch.randn(48, 64)
    g = torch.randn(32, 48)
    results = []
    for real in (False, True):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fp8._Fp8Matmul.apply(xr, wr, real)
        y.backward(g)
        results.append((y, xr.grad, wr.grad))
    for sim, real in zip(*results, strict=True):
        torch.testing.assert_close(real, sim, rtol=1e-5, atol=1e-4)
