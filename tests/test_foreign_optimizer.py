"""An optimizer not built from umup_fx's groups on a transformed model (runtime/optim.py):
warned once, never for umup_fx's own; clipping every step warned whatever the optimizer;
HF Trainer with ``optimizers=(umup_fx.AdamW(model), None)`` trains as the recipe loop."""

from __future__ import annotations

import tempfile
import warnings

import pytest
import torch
from torch import nn

import umup_fx
from examples.llama import Llama
from tests.test_clip import _batch, _llama, _steps
from tests.tiny_models import hf_llama


def _transformed() -> Llama:
    """A fresh one each time (a deepcopy would lose the parameters' marks: torch's
    Parameter.__deepcopy__ keeps data and requires_grad only)."""
    return umup_fx.transform(_llama(), _batch())


def _of(caught: list, category: type) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, category)]


def test_a_foreign_optimizer_warns_once_naming_the_u_mup_route() -> None:
    model = _transformed()
    found = _of(_steps(model, torch.optim.AdamW(model.parameters(), lr=1e-3)),
                umup_fx.ForeignOptimizerWarning)
    assert len(found) == 1
    assert "AdamW steps on" in found[0] and "0.001" in found[0]
    assert "umup_fx.AdamW(model" in found[0] and "umup_fx.param_groups(model" in found[0]
    assert "optimizers=(umup_fx.AdamW(model" in found[0]


@pytest.mark.parametrize("build", ["umup_fx.AdamW", "param_groups", "sgd_param_groups"])
def test_optimizers_built_from_u_mup_groups_do_not_warn(build: str) -> None:
    model = _transformed()
    opt = {
        "umup_fx.AdamW": lambda: umup_fx.AdamW(model, lr=2**-6),
        "param_groups": lambda: torch.optim.AdamW(umup_fx.param_groups(model, lr=2**-6)),
        "sgd_param_groups": lambda: torch.optim.SGD(umup_fx.param_groups(model, lr=2**-6)),
    }[build]()
    assert not _of(_steps(model, opt), umup_fx.ForeignOptimizerWarning)


def test_plain_exported_and_sp_models_take_any_optimizer() -> None:
    sp = umup_fx.transform(_llama(), _batch(), parametrization="sp")
    for model in (_llama(), umup_fx.export(_transformed()), sp):
        caught = _steps(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
        assert not _of(caught, umup_fx.ForeignOptimizerWarning), type(model).__name__


def test_clipping_every_step_warns_under_a_foreign_optimizer_too() -> None:
    model = _transformed()
    caught = _steps(model, torch.optim.AdamW(model.parameters(), lr=1e-3), steps=4, clip=1.0)
    found = _of(caught, umup_fx.AlwaysClippedWarning)
    assert len(found) == 1 and "max_grad_norm" in found[0]
    model = _transformed()
    unclipped = _steps(model, torch.optim.AdamW(model.parameters(), lr=1e-3), steps=4)
    assert not _of(unclipped, umup_fx.AlwaysClippedWarning)


def _trainer(model: nn.Module, rows: torch.Tensor, steps: int, **kwargs):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    optimizers = kwargs.pop("optimizers", (None, None))
    args = transformers.TrainingArguments(
        tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=2, logging_steps=1,
        report_to=[], save_strategy="no", use_cpu=True, **kwargs)
    return transformers.Trainer(model=model, args=args, optimizers=optimizers,
                                train_dataset=[{"input_ids": r, "labels": r} for r in rows])


def _hf(rows: torch.Tensor) -> nn.Module:
    return umup_fx.transform(hf_llama(), (), {"input_ids": rows[:2], "labels": rows[:2]})


def _losses(trainer) -> list[float]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    trainer.caught = caught
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.slow
def test_trainer_with_the_u_mup_optimizer_trains_as_the_recipe_and_its_default_warns() -> None:
    steps = 6
    row = torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(0))
    rows = row.expand(4, 32)  # one batch, whatever order Trainer samples in

    model = _hf(rows)  # the recipe loop (docs/training.md, "A plain loop")
    opt, recipe = umup_fx.AdamW(model, lr=2**-2), []
    for _ in range(steps):
        loss = model(input_ids=rows[:2], labels=rows[:2]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        recipe.append(loss.item())

    model = _hf(rows)  # Trainer with the one argument (and the recipe's constant LR, no clip)
    ours = _trainer(model, rows, steps, optimizers=(umup_fx.AdamW(model, lr=2**-2), None),
                    lr_scheduler_type="constant", max_grad_norm=0)
    assert _losses(ours) == pytest.approx(recipe, rel=1e-4, abs=1e-4)
    assert recipe[-1] < recipe[0] - 1.0
    assert not _of(ours.caught, umup_fx.ForeignOptimizerWarning)

    default = _trainer(_hf(rows), rows, steps)  # Trainer's own AdamW (lr 5e-5), clip 1.0
    losses = _losses(default)
    assert losses[-1] > losses[0] - 0.1  # it hardly moves: what the warnings are about
    assert len(_of(default.caught, umup_fx.ForeignOptimizerWarning)) == 1
    assert len(_of(default.caught, umup_fx.AlwaysClippedWarning)) == 1
