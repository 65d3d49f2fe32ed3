"""What a new user meets first: the CLI, misuse of the API, and quiet, clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import umup_fx
from examples.llama import Llama, LlamaConfig
from tests.tiny_models import DataDependent, hf_llama
from umup_fx.__main__ import main


def _llama() -> Llama:
    torch.manual_seed(0)
    return Llama(LlamaConfig(d_model=64, n_layers=2, n_heads=4))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (2, 16), generator=gen), torch.randint(0, 256, (2, 16), generator=gen)


# -- the command line ----------------------------------------------------------------
def test_readme_cli_command_works(capsys) -> None:
    assert main(["inspect", "examples.llama:Llama", "--input", "long:2x64:256"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("u-muP plan for Llama") and "layers.{0..3}.mlp.down_proj.weight" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["inspect", "nosuch_module:X", "--input", "long:2x4"], "cannot import 'nosuch_module'"),
        (["inspect", "examples.llama:Nope", "--input", "long:2x4"], "has no 'Nope'"),
        (["inspect", "examples.mlp:MLPClassifier", "--input", "float:8xabc"], "bad --input"),
        (["inspect", "examples.mlp:MLPClassifier", "--input", "cplx:8"], "bad --input"),
        (["inspect", "examples.llama:Llama", "--arg", "nosuch=1", "--input", "long:2x8"],
         "--arg does not fit LlamaConfig"),
        (["inspect", "examples.llama:Llama"], "give its inputs with --input"),
        (["inspect", "examples.llama", "--input", "long:2x8"], "expected MODULE:FACTORY"),
        (["inspect", "examples.llama:Llama", "--arg", "d_model=abc", "--input", "long:2x8"],
         "Llama(d_model='abc') raised TypeError"),
        (["sweep", "examples.llama:Llama", "--width-arg", "dmodel", "--widths", "32", "--lrs",
          "1", "--steps", "1", "--json", "no_such_dir/s.json"], "--width-arg / --arg does not fit"),
        (["coord-check", "examples.mlp:MLPClassifier", "--width-arg", "hidden", "--widths", "32",
          "64", "--json", "no_such_dir/c.json"], "coord-check trains examples.mlp:MLPClassifier on byte tokens"),
    ],
)
def test_cli_mistakes_are_one_line(capsys, argv: list[str], message: str) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("umup_fx: ")
    assert captured.out == ""


def test_cli_help_reads_as_text(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "``" not in out and "python -m umup_fx inspect examples.llama:Llama" in out


# -- misuse of the API ---------------------------------------------------------------
def test_prepare_after_transform_and_twice_are_errors() -> None:
    model = umup_fx.transform(_llama(), _batch())
    with pytest.raises(umup_fx.AlreadyTransformedError, match="already"):
        umup_fx.prepare(model, _batch())
    prepared = umup_fx.prepare(_llama(), _batch())
    with pytest.raises(umup_fx.AlreadyTransformedError, match="prepared"):
        umup_fx.prepare(prepared, _batch())
    with pytest.raises(umup_fx.AlreadyTransformedError, match="prepared"):
        umup_fx.transform(prepared, _batch())


def test_umup_backend_on_a_transformed_model_is_an_error() -> None:
    torch._dynamo.reset()
    model = umup_fx.transform(_llama(), _batch())
    compiled = torch.compile(model, backend="umup", options={"inner": "eager"})
    with pytest.raises(Exception, match="a second time"):
        compiled(*_batch())


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, scale: float, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * scale


def test_non_tensor_arguments_are_part_of_the_call_not_silently_baked() -> None:
    model = umup_fx.transform(_Scaled(), (2.0, torch.randn(4, 8)))
    x = torch.randn(3, 8)
    two, three = model(2.0, x), model(3.0, x)  # another value: a graph of its own
    torch.testing.assert_close(three, two * 1.5)
    ids = torch.randint(0, 256, (2, 16))
    hf = umup_fx.transform(hf_llama(), (ids,), {"labels": ids})
    as_tuple = hf(ids, labels=ids, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], hf(ids, labels=ids).loss)


def test_coupled_weight_decay_is_refused() -> None:
    model = umup_fx.transform(_llama(), _batch())
    adam = torch.optim.Adam(umup_fx.param_groups(model, lr=0.1, weight_decay=0.01))
    model(*_batch()).backward()
    with pytest.raises(umup_fx.UmupError, match="decoupled"):
        adam.step()
    torch.optim.AdamW(umup_fx.param_groups(model, lr=0.1, weight_decay=0.01)).step()


def test_buffers_keep_their_names() -> None:
    model = umup_fx.transform(_llama(), _batch())
    assert [n for n, _ in model.named_buffers()] == [
        n for n, _ in _llama().named_buffers()
    ]


# -- errors are all the user sees ----------------------------------------------------
def test_capture_errors_print_nothing_before_the_message(capfd) -> None:
    with pytest.raises(umup_fx.CaptureError, match="branches on the value of a tensor"):
        umup_fx.transform(DataDependent(), (torch.randn(4, 8),))
    with pytest.raises(umup_fx.CaptureError, match="fails on the example inputs"):
        umup_fx.transform(_llama(), (torch.randint(0, 256, (2, 3, 4)),))
    captured = capfd.readouterr()
    assert captured.err.strip() == "" and captured.out.strip() == ""


def test_adamw_defaults_to_the_parametrizations_eta() -> None:
    """No lr given: eta = 2^0 for u-muP (each group's rate its factor), 2^-9 for SP."""
    model = umup_fx.transform(_llama(), _batch(), check=False)
    opt = umup_fx.AdamW(model)
    factors = {g["umup_lr_factor"]: g["lr"] for g in opt.param_groups}
    assert umup_fx.DEFAULT_LR["umup"] == 1.0 and opt.defaults["lr"] == 1.0
    assert all(lr == pytest.approx(f) for f, lr in factors.items())
    sp = umup_fx.transform(_llama(), _batch(), parametrization="sp")
    assert {g["lr"] for g in umup_fx.AdamW(sp).param_groups} == {2.0**-9}
