"""The compile path: no graph breaks, compiled == eager, the "umup" backend == transform."""

from __future__ import annotations

import math

import pytest
import torch

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
    # A new length runs; scales that read the length differ by < 1% until both routes
    # fix them at one reference length.
    xb = _batch(seed=5, b=3, s=16)
    torch.testing.assert_close(compiled(*xb), reference(*xb), rtol=1e-2, atol=0)
