"""umup_fx on a plain decoder vs the authors' hand-built u-muP ``TransformerDecoder``.

The twin (``tests/reference_twin.py``) is the reference's architecture in ordinary
PyTorch. Transformed and loaded with the reference's weights it must give the same
loss, and AdamW with ``umup_fx.param_groups`` must track ``unit_scaling.optim.AdamW``.
The one known difference (the reference unties the MLP linears' input-gradient scale,
``docs/reference-differences.md`` D1) moves gradients, so trajectories agree to ~1e-5,
not bit for bit.
"""

from __future__ import annotations

import pytest
import torch

import umup_fx
from tests.reference_twin import copy_reference_weights, make_pair, reference_lr_factors

pytest.importorskip("unit_scaling")


def _pair():
    reference, plain = make_pair(hidden=64, vocab=256, layers=2, heads=4, seed=0)
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    model = umup_fx.transform(plain, (ids,), reinit=False)
    copy_reference_weights(reference, plain)  # transform shares the plain weights
    return reference, model, ids


def test_loss_matches_reference() -> None:
    reference, model, ids = _pair()
    ours, theirs = model(ids), reference.loss(ids)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_lr_factors_match_reference() -> None:
    reference, model, _ = _pair()
    expected = reference_lr_factors(reference)
    ours = {name: p.lr_factor for name, p in model.umup_plan.params.items()}
    assert set(expected) <= set(ours)
    for name, factor in expected.items():
        assert ours[name] == pytest.approx(factor, rel=1e-12), name


def test_adamw_tracks_reference() -> None:
    import unit_scaling.optim

    reference, model, ids = _pair()
    lr, wd = 2**-3, 2**-13
    ours = torch.optim.AdamW(umup_fx.param_groups(model, lr, wd))
    theirs = unit_scaling.optim.AdamW(reference.parameters(), lr=lr, weight_decay=wd)
    gen = torch.Generator().manual_seed(2)
    losses = []
    for _ in range(8):
        batch = torch.randint(0, 256, (4, 16), generator=gen)
        pair = []
        for opt, loss_fn in ((ours, model), (theirs, reference.loss)):
            opt.zero_grad()
            loss = loss_fn(batch)
            loss.backward()
            opt.step()
            pair.append(loss.item())
        losses.append(pair)
    for step, (a, b) in enumerate(losses):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5), f"step {step}: {a} vs {b}"
    assert losses[-1][0] < losses[0][0]  # it trains
    theirs_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        if name in theirs_params:
            torch.testing.assert_close(p, theirs_params[name], rtol=1e-3, atol=1e-4)
