"""Gradient clipping under u-muP (umup_fx/runtime/clip.py): an RMS threshold, checked
against torch's own clip_grad_norm_, and the warning when every step is clipped."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import umup_fx
from examples.llama import Llama, LlamaConfig
from umup_fx.runtime.clip import AlwaysClippedWarning, SpikeClipper, clip_grad_norm_, max_grad_norm


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (2, 16), generator=gen), torch.randint(0, 256, (2, 16), generator=gen)


def _llama(seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    return Llama(LlamaConfig(d_model=64, n_layers=2, n_heads=4))


@pytest.fixture(scope="module")
def transformed() -> Llama:
    return umup_fx.transform(_llama(), _batch())


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_unit_scale_gradients_have_rms_near_one_and_a_global_norm_near_sqrt_n(transformed) -> None:
    plain = _llama()
    plain(*_batch()).backward()
    transformed.zero_grad()
    transformed(*_batch()).backward()
    grads = _grads(transformed)
    n = sum(g.numel() for g in grads)
    norm = torch.nn.utils.get_total_norm(grads).item()
    assert 0.3 < norm / math.sqrt(n) < 3  # RMS ~1: the global norm is ~sqrt(n), not ~1
    assert norm > 50 * torch.nn.utils.get_total_norm(_grads(plain)).item()


@pytest.mark.parametrize("max_rms", [1e-3, 0.5, 1e6])
def test_clip_is_torchs_clip_at_max_rms_times_sqrt_n(transformed, max_rms: float) -> None:
    transformed.zero_grad()
    transformed(*_batch()).backward()
    before = _grads(transformed)
    n = sum(g.numel() for g in before)
    truth = [nn.Parameter(torch.zeros_like(g)) for g in before]
    for t, g in zip(truth, before, strict=True):
        t.grad = g.clone()
    norm = torch.nn.utils.clip_grad_norm_(truth, max_rms * math.sqrt(n))
    rms = clip_grad_norm_(transformed, max_rms)
    assert rms.item() == pytest.approx(norm.item() / math.sqrt(n), rel=1e-6)
    for t, g in zip(truth, _grads(transformed), strict=True):
        torch.testing.assert_close(g, t.grad)
    after = torch.nn.utils.get_total_norm(_grads(transformed)).item() / math.sqrt(n)
    assert after == pytest.approx(min(max_rms, rms.item()), rel=1e-4)


def test_max_grad_norm_counts_trainable_elements_only(transformed) -> None:
    n = sum(p.numel() for p in transformed.parameters() if p.requires_grad)
    assert n < sum(p.numel() for p in transformed.parameters())  # norm gains are frozen
    assert max_grad_norm(transformed, 2.0) == pytest.approx(2.0 * math.sqrt(n))
    with pytest.raises(umup_fx.UmupError, match="max_rms"):
        max_grad_norm(transformed, 0.0)


def test_spike_clipper_clips_a_spike_and_nothing_else() -> None:
    p = nn.Parameter(torch.zeros(1000))
    gen = torch.Generator().manual_seed(0)
    clipper = SpikeClipper(factor=4.0, warmup=5)
    for _ in range(20):  # usual steps: RMS ~1, never touched
        g = torch.randn(1000, generator=gen)
        p.grad = g.clone()
        clipper([p])
        torch.testing.assert_close(p.grad, g)
    p.grad = 100 * torch.randn(1000, generator=gen)
    rms = clipper([p])
    assert rms.item() > 50
    after = p.grad.pow(2).mean().sqrt().item()
    assert 3.0 < after < 4.5  # factor x the running mean (~1)
    state = clipper.state_dict()
    fresh = SpikeClipper(factor=4.0, warmup=5)
    fresh.load_state_dict(state)
    assert fresh.steps == 21 and fresh.mean.item() == pytest.approx(clipper.mean.item())


def _steps(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 3,
           clip: float | None = None) -> list[warnings.WarningMessage]:
    """``steps`` steps on one batch, clipped by torch's global norm if ``clip``; every
    warning they raise."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            opt.zero_grad()
            model(*_batch()).backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
    return caught


def _train(model: nn.Module, clip: float | None, steps: int = 3) -> list[warnings.WarningMessage]:
    caught = _steps(model, umup_fx.AdamW(model, lr=2**-8), steps, clip)
    return [w for w in caught if issubclass(w.category, AlwaysClippedWarning)]


def test_an_sp_threshold_that_clips_every_step_warns_once() -> None:
    model = umup_fx.transform(_llama(), _batch())
    found = _train(model, clip=1.0, steps=5)  # HF Trainer's default max_grad_norm
    assert len(found) == 1
    assert "umup_fx.clip_grad_norm_" in str(found[0].message) and "global norm" in str(found[0].message)


@pytest.mark.parametrize("clip", [None, 1e9])
def test_no_warning_when_steps_are_not_clipped(clip: float | None) -> None:
    model = umup_fx.transform(_llama(), _batch())
    assert _train(model, clip=clip) == []
