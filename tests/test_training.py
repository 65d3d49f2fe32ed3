"""docs/training.md: every recipe block is run as written, then what it promises is checked.

The "plain" recipe (data, a transformed width-64 Llama, 15 steps) runs once; each test
then runs its own recipe in a copy of that namespace, as a reader following the page
would (the model object is shared: tests that must not change it work on a copy).
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from pathlib import Path

import pytest
import torch

import umup_fx

DOC = Path(__file__).resolve().parent.parent / "docs" / "training.md"


def recipes() -> dict[str, str]:
    """Each ``<!-- recipe: NAME -->`` block of docs/training.md, by name."""
    found = re.findall(r"<!-- recipe: (\w+) -->\n```python\n(.*?)```", DOC.read_text(), re.S)
    return dict(found)


def run(*names: str, namespace: dict | None = None) -> dict:
    """Execute the named recipes in order, in one namespace (a fresh one by default)."""
    ns = {} if namespace is None else namespace
    for name in names:
        exec(compile(recipes()[name], f"docs/training.md:{name}", "exec"), ns)  # noqa: S102
    return ns


def test_every_recipe_named_on_the_page_is_run_here() -> None:
    tested = {"plain", "accumulation", "clipping", "trainer", "lora", "frozen", "checkpointing",
              "resume"}
    assert set(recipes()) == tested


@pytest.fixture(scope="module")
def plain_once() -> dict:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ns = run("plain")
    ns["caught"] = caught
    return ns


@pytest.fixture
def plain(plain_once) -> dict:
    """The namespace after the plain recipe; a test may rebind names (and train on)."""
    return dict(plain_once)


def test_plain_loop_learns_without_warnings(plain) -> None:
    losses = plain["losses"]
    assert all(math.isfinite(v) for v in losses)
    assert losses[0] == pytest.approx(math.log(256), rel=0.1)  # unit init: uniform logits
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5  # it learns the byte statistics
    assert not [w for w in plain["caught"] if issubclass(w.category, umup_fx.AlwaysClippedWarning)]


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_accumulated_gradients_equal_one_batch_of_all_micro_batches(plain) -> None:
    ns = run("accumulation", namespace=plain)
    model, gen, data = ns["model"], ns["gen"], ns["data"]
    x, y = ns["get_batch"](data, 8, 32, gen)
    whole, split = copy.deepcopy(model), copy.deepcopy(model)
    for m, batches in ((whole, [(x, y)]), (split, [(x[:4], y[:4]), (x[4:], y[4:])])):
        ns["train_step"](m, umup_fx.AdamW(m, lr=1.0), batches)
    want, got = _grads(whole), _grads(split)
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_spike_clipper_recipe_sees_unit_scale_rms(plain) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ns = run("clipping", namespace=plain)
    rms = ns["rms_log"]
    assert len(rms) == 10 and all(0.01 < v < 100 for v in rms)
    assert ns["clipper"].steps == 10 and ns["clipper"].mean.item() > 0
    assert not [w for w in caught if issubclass(w.category, umup_fx.AlwaysClippedWarning)]


@pytest.fixture(scope="module")
def trainer_run(plain_once) -> dict:
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ns = run("trainer", namespace=dict(plain_once))
    ns["caught"] = caught
    return ns


@pytest.mark.slow
def test_trainer_recipe_trains_with_u_mup_groups_and_an_rms_threshold(trainer_run) -> None:
    ns = trainer_run
    history = [h for h in ns["trainer"].state.log_history if "loss" in h]
    assert len(history) == 3 and all(math.isfinite(h["loss"]) for h in history)
    trainer_opt = ns["trainer"].optimizer
    groups = getattr(trainer_opt, "optimizer", trainer_opt).param_groups  # accelerate wraps it
    assert all("umup_lr_factor" in g for g in groups)
    n = sum(p.numel() for p in ns["hf"].parameters() if p.requires_grad)
    assert ns["args"].max_grad_norm == pytest.approx(10.0 * math.sqrt(n))
    assert not [w for w in ns["caught"] if issubclass(w.category, umup_fx.AlwaysClippedWarning)]


@pytest.mark.slow
def test_trainer_gradient_norm_is_the_models_own(trainer_run) -> None:
    ns = trainer_run
    logged = [h["grad_norm"] for h in ns["trainer"].state.log_history if "grad_norm" in h]
    rms = [v / umup_fx.max_grad_norm(ns["hf"], 1.0) for v in logged]
    assert all(0.2 < v < 5 for v in rms), rms  # unit-scale gradients, as in a plain call


def test_lora_recipe_trains_the_adapters_of_the_transformed_model(plain) -> None:
    pytest.importorskip("peft")
    ns = run("lora", namespace=plain)
    inner = ns["lora"].base_model.model
    names = {n for g in ns["lora_opt"].param_groups for n in g["names"]}
    assert names and all("lora_A" in n or "lora_B" in n for n in names)
    assert umup_fx.runtime.modules.is_transformed(inner)
    assert any(p.abs().sum() > 0 for n, p in inner.named_parameters() if "lora_B" in n)  # trained


def test_frozen_parameters_stay_and_get_no_group(plain) -> None:
    ns = run("frozen", namespace=plain)
    model, opt = ns["model"], ns["opt"]
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert "embed.weight" in frozen and "layers.0.attn.q_proj.weight" in frozen
    grouped = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) not in grouped for n, p in model.named_parameters() if n in frozen)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = ns["get_batch"](ns["data"], 8, 32, ns["gen"])
    model(x, y).backward()
    opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n in frozen), n


def test_resumed_run_continues_exactly(plain) -> None:
    ns = run("resume", namespace=plain)
    batches = [ns["get_batch"](ns["data"], 8, 32, ns["gen"]) for _ in range(2)]
    for model, opt in ((ns["model"], ns["opt"]), (ns["resumed"], ns["resumed_opt"])):
        for x, y in batches:
            opt.zero_grad(set_to_none=True)
            model(x, y).backward()
            opt.step()
    for (name, a), (_, b) in zip(ns["model"].named_parameters(), ns["resumed"].named_parameters(),
                                 strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)


def test_trainer_default_max_grad_norm_warns_that_it_clips_every_step(trainer_run) -> None:
    """Trainer's default max_grad_norm=1.0 on unit-scale gradients: said once, not silent."""
    import tempfile

    from transformers import Trainer, TrainingArguments

    ns = trainer_run
    args = TrainingArguments(tempfile.mkdtemp(), max_steps=4, per_device_train_batch_size=2,
                             report_to=[], save_strategy="no", use_cpu=True)
    assert args.max_grad_norm == 1.0
    trainer = Trainer(model=ns["hf"], args=args, optimizers=(umup_fx.AdamW(ns["hf"], lr=2**-6), None),
                      train_dataset=[{"input_ids": r, "labels": r} for r in ns["rows"]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    found = [w for w in caught if issubclass(w.category, umup_fx.AlwaysClippedWarning)]
    assert len(found) == 1 and "max_grad_norm" in str(found[0].message)


def test_activation_checkpointing_recipe_keeps_loss_and_gradients(plain) -> None:
    """Last in the file: it wraps the shared model's blocks."""
    model = plain["model"]
    x, y = plain["get_batch"](plain["data"], 4, 32, plain["gen"])
    model.zero_grad()
    loss = model(x, y)
    loss.backward()
    want = _grads(model)
    ns = run("checkpointing", namespace=plain)
    model.zero_grad()
    again = model(x, y)
    again.backward()
    assert "_checkpoint_wrapped_module" in next(n for n, _ in model.named_parameters() if "layers" in n)
    assert again.item() == pytest.approx(loss.item(), rel=1e-6)
    got = {umup_fx.runtime.names.canonical_name(n): g for n, g in _grads(ns["model"]).items()}
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-7, msg=name)
