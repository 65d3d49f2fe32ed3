"""Errors raised while a transformed model runs: the model's own error for a call it
rejects as written, else a GraphRunError naming the user's source line and op."""

from __future__ import annotations

import traceback
import warnings

import pytest
import torch

import umup_fx
from examples.llama import Llama, LlamaConfig
from umup_fx.errors import GraphRunError


def _pair() -> tuple[Llama, Llama]:
    """The example Llama as written, and a transformed copy of it."""
    torch.manual_seed(0)
    written = Llama(LlamaConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=32))
    torch.manual_seed(0)
    model = Llama(LlamaConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        umup_fx.transform(model, (torch.randint(0, 256, (2, 8)),), check=False)
    return written, model


@pytest.fixture(scope="module")
def models() -> tuple[Llama, Llama]:
    return _pair()


@pytest.mark.parametrize("bad", [
    torch.randint(0, 256, (8,)),            # 1-D: the attention's B, T, _ = x.shape fails
    torch.randint(256, 300, (2, 8)),        # token ids past the vocabulary
    torch.randint(0, 256, (2, 40)),         # longer than max_seq_len (RoPE tables)
], ids=["1d", "vocab", "too_long"])
def test_a_call_the_model_rejects_gets_the_models_own_error(models, bad: torch.Tensor) -> None:
    written, model = models
    with pytest.raises(Exception) as own:
        written(bad)
    with pytest.raises(type(own.value)) as ours:
        model(bad)
    assert str(ours.value) == str(own.value)
    frames = traceback.extract_tb(ours.value.__traceback__)
    assert not any("eval_with_key" in f.filename or "umup_fx" in f.filename for f in frames[-3:])
    assert ours.value.__cause__ is None


def test_a_failure_of_the_rewrite_names_the_users_line_and_op(models) -> None:
    _, model = models
    gm, node = next((g, n) for g in model.region_graphs().values() for n in g.graph.nodes
                    if n.op == "call_function"
                    and "down_proj" in (n.meta.get("stack_trace") or " ").splitlines()[-1])
    target = node.target

    def broken(*args, **kwargs):
        raise RuntimeError("simulated bug in a u-muP op")

    node.target = broken
    gm.recompile()
    try:
        with pytest.raises(GraphRunError) as err:
            model(torch.randint(0, 256, (2, 8)))
    finally:
        node.target = target
        gm.recompile()
    text = str(err.value)
    assert 'llama.py", line 125' in text and "down_proj" in text
    assert f"node {node.name}" in text and "simulated bug" in text
    assert "as written runs this call without error" in text
    assert isinstance(err.value.__cause__, RuntimeError)


class _NormThenAdd(torch.nn.Module):
    """Batch norm, then an add the caller's ``bias`` must fit."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn, self.out = torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.out(self.bn(self.fc(x))) + bias


def test_the_model_as_written_tried_on_a_failing_call_leaves_no_trace() -> None:
    """The call updates the batch-norm statistics once, before it fails, as the plain
    model's does; the trial run of the model as written adds nothing."""
    torch.manual_seed(0)
    model = umup_fx.transform(_NormThenAdd(), (torch.randn(32, 8), torch.randn(32, 4)), check=False)
    x, bias = torch.randn(32, 8), torch.randn(32, 5)
    rng = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="size of tensor a"):  # the model's own error
        model(x, bias)
    assert int(model.bn.num_batches_tracked) == 1
    assert torch.equal(rng, torch.get_rng_state())
