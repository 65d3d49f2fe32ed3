"""The compile path: no graph breaks, compiled == eager, the "umup" backend == transform."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import umup_fx
from examples.llama import Llama, LlamaConfig
from tests.tiny_models import hf_llama


def _llama(seed: int = 0, d: int = 64, layers: int = 2) -> Llama:
    torch.manual_seed(seed)
    return Llama(LlamaConfig(d_model=d, n_layers=layers, n_heads=4))


def _batch(seed: int = 1, b: int = 4, s: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, s), generator=gen), torch.randint(0, 256, (b, s), generator=gen)


def _train(model, step_fn, steps: int = 5) -> list[float]:
    opt = umup_fx.AdamW(model, lr=2**-4)
    losses = []
    for i in range(steps):
        opt.zero_grad()
        loss = step_fn(*_batch(seed=10 + i))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_no_graph_breaks_example_llama() -> None:
    model = umup_fx.transform(_llama(), _batch())
    report = torch._dynamo.explain(model)(*_batch())
    assert report.graph_break_count == 0, report.break_reasons
    assert report.graph_count == 1


def test_no_graph_breaks_hf_llama() -> None:
    pytest.importorskip("transformers")
    ids = _batch()[0]
    model = umup_fx.transform(hf_llama(hidden=64), (ids,), {"labels": ids})
    report = torch._dynamo.explain(model)(ids, labels=ids)
    assert report.graph_break_count == 0, report.break_reasons


@pytest.mark.slow
def test_compiled_trains_like_eager() -> None:
    # Inductor reorders float32 arithmetic: losses agree to ~1e-5 relative, not bitwise.
    eager = umup_fx.transform(_llama(d=32, layers=1), _batch())
    compiled_src = umup_fx.transform(_llama(d=32, layers=1), _batch())
    compiled = torch.compile(compiled_src)
    a = _train(eager, eager)
    b = _train(compiled_src, compiled)
    assert a == pytest.approx(b, rel=1e-4)
    assert a[-1] < a[0]


def test_backend_runs_the_same_passes_as_transform() -> None:
    x = _batch()
    via_transform = umup_fx.transform(_llama(), x)
    prepared = umup_fx.prepare(_llama(), x)
    compiled = torch.compile(prepared, backend="umup", options={"inner": "aot_eager"})
    torch.testing.assert_close(compiled(*x), via_transform(*x))
    a = _train(via_transform, via_transform, steps=3)
    b = _train(prepared, compiled, steps=3)
    assert a == pytest.approx(b, rel=1e-5)
    plan = umup_fx.backend.compiled_plans[-1]
    assert {n: p.lr_factor for n, p in plan.params.items()} == {
        n: p.lr_factor for n, p in via_transform.umup_plan.params.items()
    }


def test_backend_with_no_ceremony() -> None:
    """torch.compile(model, backend="umup") alone; the optimizer is built first."""
    torch._dynamo.reset()
    model = _llama()
    compiled = torch.compile(model, backend="umup", options={"inner": "aot_eager"})
    opt = umup_fx.AdamW(compiled, lr=2**-4)
    plain = torch.optim.Adam(umup_fx.param_groups(compiled, lr=2**-4))
    with pytest.raises(umup_fx.UmupError, match="before its u-muP learning rate"):
        plain.step()  # no compiled call yet: the factors are unknown
    x = _batch()
    loss = compiled(*x)
    assert loss.item() == pytest.approx(math.log(256), rel=0.02)  # unit init happened
    assert model.layers[0].attn.q_proj.weight.std().item() == pytest.approx(1.0, rel=0.1)
    reference = umup_fx.transform(_llama(), x)
    want = {n: p.lr_factor for n, p in reference.umup_plan.params.items()}
    for group in plain.param_groups:
        assert group["lr"] == pytest.approx(2**-4 * want[group["names"][0]])
    loss.backward()
    opt.step()
    # Merged into one group per factor at the first step, each name with its factor
    # (norm gains stay listed: the rewritten graph no longer reads them, so they get
    # no gradient and AdamW skips them).
    assert len(opt.param_groups) < 10
    for group in opt.param_groups:
        for name in group["names"]:
            assert group["umup_lr_factor"] == pytest.approx(want[name]), name
    # A recompile keeps the trained weights (they are marked at the first compile).
    before = model.lm_head.weight.detach().clone()
    torch._dynamo.reset()
    compiled(*x)
    assert torch.equal(model.lm_head.weight, before)


def test_backend_options() -> None:
    torch._dynamo.reset()
    x = _batch()
    model = umup_fx.prepare(_llama(), x, roles={"embed.weight": "input"})
    bad = torch.compile(model, backend="umup", options={"trainable_norms": True})
    with pytest.raises(Exception, match="prepare"):
        bad(*x)
    torch._dynamo.reset()
    compiled = torch.compile(
        model, backend="umup", options={"hparams": {"output_mult": 2.0}, "inner": "eager"}
    )
    compiled(*x)
    assert umup_fx.backend.compiled_plans[-1].hparams.output_mult == 2.0


def test_backend_refuses_pretrained_and_says_where_it_works() -> None:
    # The backend would leave the weights as they are: a different function, silently.
    with pytest.raises(umup_fx.UmupError, match=r"transform\(model, inputs, pretrained=True\)"):
        umup_fx.prepare(_llama(layers=1), _batch(), pretrained=True)


def test_dynamic_true_is_an_umup_error_saying_what_to_do() -> None:
    torch._dynamo.reset()
    compiled = torch.compile(_llama(layers=1), backend="umup", dynamic=True,
                             options={"inner": "aot_eager"})
    with pytest.raises(umup_fx.UmupError, match="Leave dynamic unset"):
        compiled(*_batch())
    torch._dynamo.reset()


def test_dump_before_and_after(tmp_path, monkeypatch) -> None:
    torch._dynamo.reset()
    monkeypatch.setenv("UMUP_FX_DUMP", str(tmp_path))
    model = umup_fx.prepare(_llama(layers=1), _batch())
    torch.compile(model, backend="umup", options={"inner": "eager"})(*_batch())
    before = sorted(tmp_path.glob("*.before.py"))
    after = sorted(tmp_path.glob("*.after.py"))
    assert before and after
    assert "umup_fx" not in before[-1].read_text()
    assert "residual_split" in after[-1].read_text()


def test_explain_a_compiled_model() -> None:
    model = umup_fx.prepare(_llama(layers=1), _batch())
    compiled = torch.compile(model, backend="umup")
    report = umup_fx.explain(compiled)
    assert "u-muP plan for Llama" in report and "layers.0.attn.q_proj.weight" in report
    transformed = torch.compile(umup_fx.transform(_llama(layers=1), _batch()))
    assert "residual branches" in umup_fx.explain(transformed)


def test_backend_takes_new_batch_and_sequence_sizes_and_has_a_plan() -> None:
    """No dynamic=False needed: a size Dynamo makes dynamic is compiled per size; the
    outputs match transform's graphs on the same weights, and the model carries the
    plan for umup_fx.explain, as after transform."""
    torch._dynamo.reset()
    model = _llama(layers=1)
    compiled = torch.compile(model, backend="umup", options={"inner": "aot_eager"})
    with pytest.raises(umup_fx.UmupError, match="first compiled call"):
        umup_fx.explain(compiled)
    x = _batch(b=4, s=32)
    compiled(*x)
    assert "u-muP plan for Llama" in umup_fx.explain(compiled)
    assert compiled.umup_plan is model.umup_plan
    fresh = _llama(layers=1)
    fresh.load_state_dict(model.state_dict())  # the unit-initialised weights, unmarked
    reference = umup_fx.transform(fresh, x, reinit=False, check=False)
    xb = _batch(seed=3, b=3, s=32)  # a new batch size: the same numbers
    torch.testing.assert_close(compiled(*xb), reference(*xb))
    xb = _batch(seed=5, b=3, s=16)  # and a new length: the first call's reference sizes
    torch.testing.assert_close(compiled(*xb), reference(*xb))


# -- the backend keeps the first compile's reference sizes (rules §3) --------------------
def _small(seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    return Llama(LlamaConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=64))


def _ids(b: int, s: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 64, (b, s), generator=torch.Generator().manual_seed(seed))


def _close_rel(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    err = (a - b).abs().max().item() / b.abs().max().item()
    assert err <= rel, f"relative difference {err:.2e} > {rel:.0e}"


def _twin(model: nn.Module, example: tuple) -> nn.Module:
    """``transform`` of a copy of ``model``'s (already unit-initialised) weights."""
    twin = _small()
    twin.load_state_dict(model.state_dict())
    return umup_fx.transform(twin, example, reinit=False, check=False)


def test_backend_keeps_the_first_compiles_reference_sizes() -> None:
    """Compiled at (2, 8), called at (3, 16): logits and every gradient are those of
    transform(model, example at (2, 8)) called at (3, 16)."""
    torch._dynamo.reset()
    model = _small()
    compiled = torch.compile(model, backend="umup", options={"inner": "aot_eager"})
    with torch.no_grad():
        compiled(_ids(2, 8, seed=1))  # the first compile: unit init, reference sizes
    assert model.umup_reference_shapes == {"idx": (2, 8)}
    twin = _twin(model, (_ids(2, 8, seed=1),))
    idx, tgt = _ids(3, 16, seed=2), _ids(3, 16, seed=3)
    losses = []
    for m, run in ((model, compiled), (twin, twin)):
        logits = run(idx)
        loss = F.cross_entropy(logits.flatten(0, 1), tgt.flatten())
        loss.backward()
        losses.append((logits.detach(), dict(m.named_parameters())))
    (got, params), (want, twin_params) = losses
    _close_rel(got, want)
    for name, p in twin_params.items():
        if p.grad is not None:
            _close_rel(params[name].grad, p.grad)


def test_backend_is_causal_at_every_length() -> None:
    """Appending tokens leaves the first positions' logits as they were: the attention
    scale stays at the first compile's length."""
    torch._dynamo.reset()
    compiled = torch.compile(_small(), backend="umup", options={"inner": "aot_eager"})
    idx = _ids(2, 16, seed=4)
    with torch.no_grad():
        short, long = compiled(idx[:, :8]), compiled(idx)
    _close_rel(long[:, :8], short)


def test_prepare_sets_the_backends_reference_sizes() -> None:
    """prepare's example inputs (meta: free) are the reference, whatever the first call's
    sizes, when Dynamo's graph leaves them symbolic (mark_dynamic); a graph with the
    call's sizes written in says it cannot keep them (ReferenceSizeWarning)."""
    torch._dynamo.reset()
    example = torch.empty(2, 8, dtype=torch.long, device="meta")
    model = umup_fx.prepare(_small(), (example,))
    twin = _twin(model, (_ids(2, 8, seed=1),))
    compiled = torch.compile(model, backend="umup", options={"inner": "aot_eager"})
    idx = _ids(3, 16, seed=5)
    torch._dynamo.mark_dynamic(idx, [0, 1])
    with torch.no_grad():
        _close_rel(compiled(idx), twin(idx))
    torch._dynamo.reset()
    with pytest.warns(umup_fx.ReferenceSizeWarning, match=r"reference sizes \[\('idx', \(2, 8\)\)\]"), \
            torch.no_grad():
        compiled(_ids(3, 16, seed=5))


@pytest.mark.slow
def test_backend_on_hf_llama_equals_transform_at_a_new_size() -> None:
    """HF's rotary table is a buffer Dynamo passes as an input (its sizes are not data
    dims: k_proj stays hidden) and its causal mask is built from sizes Dynamo passes as
    inputs (still recognised causal): the backend's logits and gradients at a new size
    are transform's."""
    pytest.importorskip("transformers")
    torch._dynamo.reset()
    model = hf_llama(vocab=64, hidden=32, layers=1)
    compiled = torch.compile(model, backend="umup", options={"inner": "aot_eager"})
    first = _ids(2, 8, seed=1)
    with torch.no_grad():
        compiled(input_ids=first)
    twin = hf_llama(vocab=64, hidden=32, layers=1)
    twin.load_state_dict(model.state_dict())
    umup_fx.transform(twin, (), {"input_ids": first}, reinit=False, check=False)
    roles = {n: p.role for n, p in twin.umup_plan.params.items()}
    assert {n: p.role for n, p in model.umup_plan.params.items()} == roles
    idx, tgt = _ids(3, 16, seed=2), _ids(3, 16, seed=3)
    out = {}
    for name, run in (("backend", compiled), ("transform", twin)):
        logits = run(input_ids=idx).logits
        F.cross_entropy(logits.flatten(0, 1), tgt.flatten()).backward()
        out[name] = logits.detach()
    _close_rel(out["backend"], out["transform"])
    twin_params = dict(twin.named_parameters())
    for name, p in model.named_parameters():
        if p.grad is not None:
            _close_rel(p.grad, twin_params[name].grad)
