"""``umup_fx.transform`` end to end: unit scale at init, state, optimizer, bad input."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import umup_fx
from examples.gpt import GPT, GPTConfig
from examples.llama import Llama, LlamaConfig
from tests.tiny_models import ResidualMLPStack, SinMLP, graph_nodes, hf_llama
from umup_fx.diagnose.tracking import op_scales

# §8's exceptions, and one of ours (documented in docs/rewrite.md):
# - readout output ~ fan_in^-1/2; q/k projection grads ~ S^-1/2 (rules §8);
# - attention beyond the first layer: the residual stream then carries each position's
#   causal running mean, so values are correlated across positions and averaging them
#   shrinks them less than the SDPA rule assumes (measured 2.0-2.2 at S = 64);
# - gradients inside the MLP (gate / up outputs, the gated unit): the down projection's
#   input-gradient scale is tied to its forward, fan_in^-1/2 = d_ff^-1/2, while its
#   gradient sums over fan_out = d_model, so they are sqrt(d_model / d_ff) ~ 0.58 times
#   the gradient above them (the reference library unties exactly this, D1);


def _llama(d: int, layers: int = 2, seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    return Llama(LlamaConfig(d_model=d, n_layers=layers, n_heads=4))


def _batch(vocab: int = 256, b: int = 4, s: int = 64, seed: int = 1) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (b, s), generator=gen), torch.randint(0, vocab, (b, s), generator=gen)


def _check_unit_scale(model: umup_fx.UmupModule, records, seq: int, d: int, readout: str) -> None:
    qk_names = ("q_proj", "k_proj")
    down = next(p for n, p in model.umup_plan.params.items() if "down_proj" in n)
    mlp_ratio = (down.fan_out_value / down.fan_in_value) ** 0.5
    seen_attention = 0
    for r in records:
        where = f"{r.node} ({r.rule}, {r.weight})"
        out_lo, out_hi, grad_lo, grad_hi = 0.5, 2.0, 0.5, 2.0
        if r.weight == readout:
            out_lo, out_hi = 0.5 * d**-0.5, 2 * d**-0.5
        if r.weight and any(q in r.weight for q in qk_names):
            # Below S^-1/2 as d_head grows (muP's 1/d_head logits): 0.047 at d_head 128.
            grad_lo, grad_hi = seq**-0.5 / 8, 2 * seq**-0.5
        if r.rule == "gated" or (r.weight and ("gate_proj" in r.weight or "up_proj" in r.weight)):
            grad_lo = 0.5 * mlp_ratio
        if r.rule == "sdpa":
            seen_attention += 1
        if seen_attention > 1 and (r.rule == "sdpa" or (r.weight and "o_proj" in r.weight)):
            out_hi = 2.5
        assert out_lo <= r.out_rms <= out_hi, f"{where}: output RMS {r.out_rms:.3g}"
        if r.grad_rms is not None:
            assert grad_lo <= r.grad_rms <= grad_hi, f"{where}: grad RMS {r.grad_rms:.3g}"
    assert seen_attention >= 1


@pytest.mark.parametrize("d", [64, 128, 256, 512])
def test_unit_scale_at_init_example_llama(d: int) -> None:
    model = umup_fx.transform(_llama(d), _batch())
    _check_unit_scale(model, op_scales(model, *_batch(seed=2)), seq=64, d=d, readout="lm_head.weight")


def test_unit_scale_at_init_grouped_query_attention() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(d_model=128, n_layers=2, n_heads=8, n_kv_heads=2)
    model = umup_fx.transform(Llama(config), _batch())
    sdpa = [
        n for n in graph_nodes(model)
        if n.target is umup_fx.runtime.ops.scaled_dot_product_attention
    ]
    assert [n.kwargs["kv_group"] for n in sdpa] == [4, 4]
    records = op_scales(model, *_batch(seed=2))
    assert len(records) > 20
    _check_unit_scale(model, records, seq=64, d=128, readout="lm_head.weight")


def test_unit_scale_at_init_hf_llama() -> None:
    pytest.importorskip("transformers")
    ids, _ = _batch()
    model = umup_fx.transform(hf_llama(hidden=128), (ids,), {"labels": ids})
    out = model(ids, labels=ids)
    assert out.loss.item() == pytest.approx(math.log(256), rel=0.05)
    records = op_scales(model, ids, labels=ids)
    _check_unit_scale(model, records, seq=64, d=128, readout="lm_head.weight")


def test_initial_loss_is_log_vocab_and_weights_unit() -> None:
    model = umup_fx.transform(_llama(64), _batch())
    assert model(*_batch()).item() == pytest.approx(math.log(256), rel=0.02)
    for name, p in model.named_parameters():
        plan = model.umup_plan.params[name]
        if plan.init == "normal":
            assert p.std().item() == pytest.approx(1.0, rel=0.1), name
        elif plan.init == "ones":
            assert torch.all(p == 1) and not p.requires_grad, name


def test_same_names_and_state_dict_round_trip() -> None:
    original_names = [n for n, _ in _llama(64).named_parameters()]
    a = umup_fx.transform(_llama(64, seed=0), _batch())
    b = umup_fx.transform(_llama(64, seed=5), _batch())
    assert [n for n, _ in a.named_parameters()] == original_names
    x = _batch(seed=3)
    assert not torch.equal(a(*x), b(*x))
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a(*x), b(*x))


def test_other_batch_and_sequence_sizes() -> None:
    model = umup_fx.transform(_llama(64), _batch())
    loss = model(*_batch(b=3, s=40))
    assert torch.isfinite(loss)


def test_lr_factors_follow_rules_reference_values() -> None:
    # rules §5: embedding (2^8, 2^4) -> eta/4; hidden weight in a depth-3 stack with
    # fan_in 16 -> eta/4/sqrt(3); its bias -> eta/sqrt(3); readout -> eta.
    torch.manual_seed(0)
    model = umup_fx.transform(ResidualMLPStack(), (torch.randint(0, 256, (4, 8)),))
    groups = umup_fx.param_groups(model, lr=1.0, weight_decay=0.1)
    factor = {name: g["lr"] for g in groups for name in g["names"]}
    assert factor["embed.weight"] == pytest.approx(1 / 4)
    for i in range(3):
        assert factor[f"blocks.{i}.weight"] == pytest.approx(1 / 4 / math.sqrt(3))
        assert factor[f"blocks.{i}.bias"] == pytest.approx(1 / math.sqrt(3))
    assert factor["readout.weight"] == pytest.approx(1.0)
    for g in groups:  # independent weight decay: lr * wd is the base wd
        assert g["lr"] * g["weight_decay"] == pytest.approx(0.1)


def test_adamw_trains() -> None:
    model = umup_fx.transform(_llama(64), _batch())
    opt = umup_fx.AdamW(model, lr=2**-4)
    x = _batch(seed=4)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = model(*x)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_eval_turns_dropout_off() -> None:
    torch.manual_seed(0)
    model = umup_fx.transform(GPT(GPTConfig(dropout=0.2, n_layer=2, n_embd=64)), _batch(s=32))
    x = _batch(s=32, seed=5)
    assert not torch.equal(model(*x), model(*x))  # train mode: dropout on
    model.eval()
    torch.testing.assert_close(model(*x), model(*x))


def test_cross_entropy_outside_the_model() -> None:
    model = umup_fx.transform(_llama(64), (_batch()[0],))
    idx, tgt = _batch()
    logits = model(idx)
    loss = umup_fx.cross_entropy(logits.flatten(0, 1), tgt.flatten())
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits.flatten(0, 1), tgt.flatten()))
    logits.retain_grad()
    loss.backward()
    # The logits get the mean's gradient; the readout carries V/sqrt(V-1) x the reference
    # rows (rules §3), so its weight gradient is unit scale, not divided by the rows.
    plain = torch.softmax(logits.detach(), -1) - torch.nn.functional.one_hot(tgt, 256)
    torch.testing.assert_close(logits.grad, plain / tgt.numel())
    assert model.lm_head.weight.grad.pow(2).mean().sqrt().item() == pytest.approx(1.0, rel=0.5)


# -- bad input -------------------------------------------------------------------------
def test_wrong_hparams() -> None:
    with pytest.raises(umup_fx.HParamsError, match="residual_mult"):
        umup_fx.transform(_llama(64), _batch(), hparams={"residual_mult": -1.0})
    with pytest.raises(umup_fx.HParamsError, match="Unknown"):
        umup_fx.transform(_llama(64), _batch(), hparams={"lr": 1.0})
    with pytest.raises(umup_fx.UmupError, match="Unknown umup_fx option"):
        umup_fx.transform(_llama(64), _batch(), fp16=True)


def test_transform_twice_is_an_error() -> None:
    original = _llama(64)
    model = umup_fx.transform(original, _batch())
    with pytest.raises(umup_fx.AlreadyTransformedError, match="already"):
        umup_fx.transform(model, _batch())
    with pytest.raises(umup_fx.AlreadyTransformedError, match="re-initialised"):
        umup_fx.transform(original, _batch())


def test_uncovered_op_warns_and_passes_through() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 16)
    with pytest.warns(umup_fx.UncoveredOpWarning, match="sin"):
        model = umup_fx.transform(SinMLP(), (x,))
    assert any("sin" in op for _, op, _ in model.umup_plan.uncovered)
    assert "aten.sin" in umup_fx.explain(model)
    assert torch.isfinite(model(x)).all()


def test_user_frozen_parameters_stay_frozen() -> None:
    base = _llama(64)
    base.embed.weight.requires_grad_(False)
    model = umup_fx.transform(base, _batch())
    names = {n for g in umup_fx.param_groups(model, lr=0.1) for n in g["names"]}
    assert "embed.weight" not in names and "lm_head.weight" in names
    before = model.embed.weight.clone()
    opt = umup_fx.AdamW(model, lr=0.1)
    model(*_batch()).backward()
    opt.step()
    assert torch.equal(model.embed.weight, before)


def test_param_groups_errors() -> None:
    # A model with no plan yet gets pending groups; stepping on them is the error.
    untransformed = _llama(64)
    opt = torch.optim.AdamW(umup_fx.param_groups(untransformed, lr=0.1))
    untransformed(*_batch()).backward()
    with pytest.raises(umup_fx.UmupError, match="neither transformed nor run"):
        opt.step()
    model = umup_fx.transform(_llama(64), _batch())
    model.extra = torch.nn.Linear(4, 4)
    with pytest.raises(umup_fx.UmupError, match="extra.weight"):
        umup_fx.param_groups(model, lr=0.1)


def test_trainable_norms_option() -> None:
    model = umup_fx.transform(_llama(64), _batch(), trainable_norms=True)
    assert model.layers[0].norm1.weight.requires_grad
    model(*_batch()).backward()
    assert model.layers[0].norm1.weight.grad is not None


def test_no_warnings_on_covered_models() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", umup_fx.UncoveredOpWarning)
        umup_fx.transform(_llama(64), _batch())


def test_moving_after_transform_follows_the_weights() -> None:
    model = umup_fx.transform(_llama(64), _batch())
    loss32 = model(*_batch())
    model.to(torch.float64)  # device and dtype are read from the weights at call time
    loss64 = model(*_batch())
    assert loss64.dtype == torch.float64
    assert loss64.item() == pytest.approx(loss32.item(), rel=1e-5)


def test_autocast_mixed_precision() -> None:
    model = umup_fx.transform(_llama(64), _batch())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(*_batch())
    loss.backward()
    assert loss.item() == pytest.approx(model(*_batch()).item(), rel=0.01)


def test_out_of_range_lists_what_is_off_unit_scale() -> None:
    from umup_fx.diagnose.tracking import OpScale, out_of_range

    records = [
        OpScale("a", "linear", "linear", out_rms=1.0, grad_rms=1.1),
        OpScale("b", "linear", "linear", out_rms=0.1, grad_rms=float("nan")),
    ]
    assert out_of_range(records) == ["b (linear) output RMS 0.1", "b (linear) grad RMS nan"]


def test_coordinate_check_is_flat_across_width() -> None:
    # rules §8 / benchmarks/coord_check.py, small: the RMS of each layer's output after a
    # few Adam steps must not trend with width under u-muP.
    import math as m

    widths, rms_by_kind = [64, 128, 256], {}
    for d in widths:
        model = umup_fx.transform(_llama(d), _batch(s=32))
        opt = umup_fx.AdamW(model, lr=1.0)
        for step in range(3):
            opt.zero_grad()
            model(*_batch(s=32, seed=20 + step)).backward()
            opt.step()
        for r in op_scales(model, *_batch(s=32, seed=9), backward=False):
            if r.weight:
                kind = r.weight.split(".")[-2]
                rms_by_kind.setdefault(kind, {}).setdefault(d, []).append(r.out_rms)
    assert {"q_proj", "o_proj", "down_proj", "lm_head"} <= set(rms_by_kind)
    for kind, per_width in rms_by_kind.items():
        ys = [m.log2(sum(per_width[d]) / len(per_width[d])) for d in widths]
        xs = [m.log2(d) for d in widths]
        mx, my = sum(xs) / 3, sum(ys) / 3
        slope = sum((a - mx) * (b - my) for a, b in zip(xs, ys, strict=True)) / sum((a - mx) ** 2 for a in xs)
        assert abs(slope) < 0.25, f"{kind}: log-log slope {slope:.2f}"
