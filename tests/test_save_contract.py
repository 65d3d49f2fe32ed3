"""What a transformed model's checkpoint is (docs/deploy.md, "Saving a transformed model").

``save_pretrained`` of a transformed Hugging Face model writes the plain model (the
plain class loads the same function) plus what brings the transformed model back bit for
bit (HF Trainer's resume); every ``state_dict`` carries the transform's settings, which
refuse a load into another transform and drive ``python -m umup_fx export``.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import umup_fx
from examples.llama import Llama, LlamaConfig
from umup_fx.errors import CheckpointError
from umup_fx.runtime import saved_state

transformers = pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors.torch")

VOCAB = 128


def _ids(b: int, s: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))


def _quiet_transform(model: torch.nn.Module, *args, **kwargs) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return umup_fx.transform(model, *args, **kwargs)


def _hf(kind: str, seed: int = 0, seq: int = 16, **options) -> torch.nn.Module:
    torch.manual_seed(seed)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=88, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, use_cache=False))
    else:  # GPT-2: tied embeddings, which export unties
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64, use_cache=False))
    ids = _ids(2, seq)
    return _quiet_transform(model, (), {"input_ids": ids, "labels": ids}, **options)


def _train(model: torch.nn.Module, steps: int = 2) -> None:
    opt = umup_fx.AdamW(model, lr=0.05)
    for step in range(steps):
        ids = _ids(2, 16, seed=10 + step)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_save_pretrained_is_the_same_function_in_the_plain_class_and_exact_back(
        kind, tmp_path) -> None:
    model = _hf(kind)
    _train(model)
    model.eval()
    model.save_pretrained(tmp_path)
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert not umup_fx.runtime.modules.is_transformed(plain)
    ids = _ids(3, 24, seed=5)
    with torch.no_grad():
        want = model(input_ids=ids, labels=ids)
        got = plain(input_ids=ids, labels=ids)
    assert _rel(got.logits, want.logits) < 1e-5
    assert abs(got.loss - want.loss) < 1e-5 * want.loss
    # The folder loads back into a model transformed the same way, bit for bit (strict:
    # the corrections and settings are consumed, nothing is missing or left over).
    twin = _hf(kind, seed=7, reinit=False)
    twin.load_state_dict(safetensors.load_file(str(tmp_path / "model.safetensors")))
    for (name, a), (_, b) in zip(model.state_dict().items(), twin.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_trainer_checkpoints_resume_bit_for_bit(tmp_path) -> None:
    """HF Trainer saves with save_pretrained and resumes with load_state_dict(strict=False)
    into the transformed model: losses, weights and optimizer / scheduler state continue."""
    from transformers import Trainer, TrainingArguments

    rows = [{"input_ids": r, "labels": r} for r in _ids(12, 16, seed=3)]

    def run(out: str, resume: str | None = None) -> tuple[torch.nn.Module, list[float]]:
        model = _hf("llama", seed=0 if resume is None else 9)
        opt = umup_fx.AdamW(model, lr=2**-4)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
        args = TrainingArguments(
            out, max_steps=4, per_device_train_batch_size=2, logging_steps=1, save_steps=2,
            save_strategy="steps", max_grad_norm=0, report_to=[], use_cpu=True, seed=0)
        trainer = Trainer(model=model, args=args, optimizers=(opt, sched), train_dataset=rows)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train(resume_from_checkpoint=resume)
        return model, [h["loss"] for h in trainer.state.log_history if "loss" in h]

    whole, losses = run(str(tmp_path / "a"))
    resumed, after = run(str(tmp_path / "b"), resume=str(tmp_path / "a" / "checkpoint-2"))
    assert len(losses) == 4 and after == losses  # the first two from the checkpoint's state
    for (name, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def _llama(seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    return Llama(LlamaConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, max_seq_len=64))


def test_the_plain_class_refuses_a_unit_scale_state_dict() -> None:
    """torch.save(model.state_dict()) holds unit-scale weights: a strict load into the plain
    class fails on the settings' key instead of computing another function."""
    model = _quiet_transform(_llama(), (_ids(2, 16),))
    state = model.state_dict()
    assert "_extra_state" in state
    with pytest.raises(RuntimeError, match="_extra_state"):
        _llama().load_state_dict(state)


def test_a_checkpoint_of_another_transform_is_refused_before_anything_loads(tmp_path) -> None:
    model = _quiet_transform(_llama(), (_ids(2, 16),))
    torch.save(model.state_dict(), tmp_path / "step.pt")
    saved = saved_state.decode(torch.load(tmp_path / "step.pt")["_extra_state"])
    assert saved["reference"] == {"idx": [2, 16]} and saved["hparams"]["output_mult"] == 1.0
    for other in (((_ids(2, 32),), {}), ((_ids(2, 16),), {"hparams": {"output_mult": 2.0}}),
                  ((_ids(2, 16),), {"pretrained": True})):
        twin = _quiet_transform(_llama(seed=1), *other[0:1], **other[1])
        before = {k: v.clone() for k, v in twin.state_dict().items()}
        with pytest.raises(CheckpointError, match="idx \\[2, 16\\]"):
            twin.load_state_dict(torch.load(tmp_path / "step.pt"))
        assert all(torch.equal(v, twin.state_dict()[k]) for k, v in before.items())
    # Transformed as the checkpoint's was (other batch contents, reinit=False): it loads.
    twin = _quiet_transform(_llama(seed=1), (_ids(2, 16, seed=4),), reinit=False)
    twin.load_state_dict(torch.load(tmp_path / "step.pt"))


def _dcp_checkpoint(tmp_path, **options) -> torch.nn.Module:
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    model = _quiet_transform(_llama(), (_ids(2, 16),), **options)
    opt = umup_fx.AdamW(model, lr=0.05)
    ids = _ids(2, 16, seed=1)
    torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
    opt.step()
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(tmp_path / "ck"))
    return model.eval()


def _cli_export(tmp_path, capsys, *inputs: str) -> int:
    from umup_fx.__main__ import main

    args = [f"--arg={k}={v}" for k, v in
            dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, max_seq_len=64).items()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return main(["export", "examples.llama:Llama", *args, *[f"--input={i}" for i in inputs],
                     "--checkpoint", str(tmp_path / "ck"), "--out", str(tmp_path / "out")])


def test_cli_export_uses_the_checkpoints_sizes_and_hparams_whatever_input_says(
        tmp_path, capsys) -> None:
    """Trained at [2, 16] with output_mult 2: an --input of [4, 64] and no hparams on the
    command line still export the model that trained."""
    model = _dcp_checkpoint(tmp_path, hparams={"output_mult": 2.0})
    assert _cli_export(tmp_path, capsys, f"long:4x64:{VOCAB}") == 0
    state = {}
    for shard in (tmp_path / "out").glob("*.safetensors"):
        state.update(safetensors.load_file(str(shard)))
    plain = _llama().eval()
    plain.load_state_dict(state)  # strict: the settings are not written
    ids = _ids(3, 24, seed=6)
    with torch.no_grad():
        assert _rel(plain(ids), model(ids)) < 1e-5
    assert "reference sizes (idx [2, 16])" in capsys.readouterr().err


def test_cli_export_refuses_what_it_cannot_rebuild_and_the_api_a_mismatch(tmp_path, capsys) -> None:
    from umup_fx.export_checkpoint import export_checkpoint

    _dcp_checkpoint(tmp_path, trainable_norms=True)
    with torch.device("meta"):
        other = _quiet_transform(_llama(), (_ids(2, 16),))  # frozen norms
    with pytest.raises(CheckpointError, match="trainable_norms"):
        export_checkpoint(other, tmp_path / "ck", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # An imported model's norm factors come from the original weights: not on meta.
    plain = _llama()
    _quiet_transform(plain, (_ids(2, 16),), pretrained=True)
    pytest.importorskip("torch.distributed.checkpoint").save(
        plain.state_dict(), checkpoint_id=str(tmp_path / "ck2"))
    (tmp_path / "ck").rename(tmp_path / "ck1")
    (tmp_path / "ck2").rename(tmp_path / "ck")
    assert _cli_export(tmp_path, capsys, f"long:2x16:{VOCAB}") == 2
    assert "pretrained=True" in capsys.readouterr().err


def test_fold_corrections_restore_every_kind_of_tensor_exactly() -> None:
    """Sparse and dense corrections, a tensor stored as it is, one written unchanged."""
    gen = torch.Generator().manual_seed(0)
    unit = {"a": torch.randn(64, 32, generator=gen), "b": torch.randn(16, generator=gen),
            "c": torch.ones(8), "d": torch.arange(4), "e": torch.randn(8, generator=gen).bfloat16()}
    plain = {"a": unit["a"] * 0.37, "c": torch.linspace(0.5, 2.0, 8), "d": unit["d"].clone(),
             "e": unit["e"] * 3.1}
    # b: every element corrected (dense), as if folded by a factor that is not one
    plain["b"] = (unit["b"].double() * 1.3 * (1 + 1e-7 * torch.randn(16, generator=gen))).float()
    extras = saved_state.fold_extras(unit, plain, {"umup_fx": 1})
    fixes = saved_state.decode(extras["_extra_state"])["fixes"]
    assert fixes["a"][0] == "sparse" and fixes["b"][0] == "dense" and fixes["c"] == ["value"]
    assert "d" not in fixes
    state = {**plain, **extras}
    saved_state._restore(state, "", saved_state.decode(extras["_extra_state"]))
    assert set(state) == set(plain) | {"_extra_state"}
    for key in plain:
        assert state[key].dtype == unit[key].dtype and torch.equal(state[key], unit[key]), key
