"""Export where big models live: a per-block FSDP2-sharded model on two gloo ranks.

One spawn: the ranks build the model on meta, transform it, shard it per block, train a
step and save a training checkpoint (model and optimizer) with DCP from both ranks; they
check that ``export`` and ``pretrained=True`` refuse sharded weights with what to do, and
rank 0 exports a twin holding the gathered full state. Here, a plain process exports
the checkpoint with the command line; both plain models' logits are compared with the
sharded transformed model's (the truth: rank 0's forward of the same batch).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import umup_fx
from examples.llama import Llama, LlamaConfig
from tests.test_distributed import _init, _run

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch without distributed")

CFG = dict(vocab_size=256, d_model=32, n_layers=2, n_heads=2, max_seq_len=16)


def _ids(seed: int, batch: int = 4) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 16), generator=torch.Generator().manual_seed(seed))


def _worker(rank: int, tmp: str, port: int) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
    )
    from torch.distributed.fsdp import fully_shard

    _init(rank, port)
    tmp_path = Path(tmp)
    # pretrained=True converts the weights it holds: sharded ones are refused up front.
    sharded = Llama(LlamaConfig(**CFG))
    fully_shard(sharded)
    with pytest.raises(umup_fx.ExportError, match="unsharded model, transform it with pretrained"):
        umup_fx.transform(sharded, (_ids(0, 2),), pretrained=True)

    # meta -> transform -> fully_shard per block + root -> to_empty -> init_ -> a step.
    with torch.device("meta"):
        model = Llama(LlamaConfig(**CFG))
    umup_fx.transform(model, (_ids(0, 2).to("meta"),))
    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    model.to_empty(device="cpu")
    umup_fx.init_(model)
    for name, buffer in Llama(LlamaConfig(**CFG)).named_buffers():  # RoPE tables
        model.get_buffer(name).copy_(buffer)
    opt = umup_fx.AdamW(model, lr=2**-4)
    x = _ids(1).chunk(2)[rank]  # called as at transform (a new call structure would
    logits = model(x)           # need the unsharded model): the loss outside
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()).backward()
    opt.step()
    opt.zero_grad()

    # A training checkpoint, as torchtitan-style loops save it: model and optimizer.
    model_sd, opt_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": opt_sd}, checkpoint_id=str(tmp_path / "ckpt"))
    model.eval()
    with torch.no_grad():
        logits = model(_ids(3))  # every rank the whole batch (FSDP gathers each block)
    # export on DTensor parameters would be a collective: refused with the DCP route.
    with pytest.raises(umup_fx.ExportError, match="python -m umup_fx export"):
        umup_fx.export(model)
    # Where the whole model fits in one process: gather it on rank 0 (every rank joins),
    # load it into an unsharded transformed twin and export that.
    full = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        twin = umup_fx.transform(Llama(LlamaConfig(**CFG)), (_ids(0, 2),))
        twin.load_state_dict(full)
        with torch.no_grad():
            gathered = umup_fx.export(twin.eval())(_ids(3))
        torch.save({"logits": logits, "gathered": gathered}, tmp_path / "logits.pt")


@pytest.mark.slow
def test_fsdp2_dcp_checkpoint_exports_to_the_sharded_models_function(tmp_path: Path) -> None:
    safetensors = pytest.importorskip("safetensors.torch")
    from umup_fx.__main__ import main

    _run(_worker, tmp_path)
    want, gathered = torch.load(tmp_path / "logits.pt").values()
    err = ((gathered - want).abs().max() / want.abs().max()).item()
    assert err < 1e-4, f"gathered on rank 0 and exported: relative error {err:.2e}"
    args = [f"--arg={k}={v}" for k, v in CFG.items()]
    assert main(["export", "examples.llama:Llama", *args, "--input", "long:2x16:256",
                 "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out")]) == 0
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    state = {}
    for shard in set(index["weight_map"].values()):
        state.update(safetensors.load_file(str(tmp_path / "out" / shard)))
    plain = Llama(LlamaConfig(**CFG)).eval()
    plain.load_state_dict(state)  # strict: every parameter, no optimizer state
    with torch.no_grad():
        got = plain(_ids(3))
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < 1e-4, f"relative error {err:.2e}"
