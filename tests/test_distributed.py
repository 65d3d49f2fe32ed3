"""Two gloo ranks on the CPU: per-block FSDP2 and DDP match one process on the global batch.

Each test spawns two processes. Rank results are written to files in ``tmp_path`` and
compared here with a single-process run of the same model on the same global batch.
"""

from __future__ import annotations

import datetime
import os
import shutil
import socket
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import umup_fx
from examples.llama import Llama, LlamaConfig

WORLD = 2
STEPS = 5
LR = 2**-5

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch without distributed")


def _config() -> LlamaConfig:
    return LlamaConfig(d_model=32, n_layers=4, n_heads=2, max_seq_len=16)


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [
        (torch.randint(0, 256, (4, 16), generator=gen), torch.randint(0, 256, (4, 16), generator=gen))
        for _ in range(STEPS + 1)
    ]


def _example() -> tuple[torch.Tensor, torch.Tensor]:
    return _batches()[0]


def _reference(tmp: Path) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Single process, global batch; saves its initial weights for the ranks."""
    torch.manual_seed(0)
    model = umup_fx.transform(Llama(_config()), _example())
    torch.save(model.state_dict(), tmp / "init.pt")
    opt = umup_fx.AdamW(model, lr=LR)
    losses, first_grads = [], {}
    for step, (x, y) in enumerate(_batches()[:STEPS]):
        opt.zero_grad()
        loss = model(x, y)
        loss.backward()
        if step == 0:
            first_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        losses.append(loss.item())
    return losses, first_grads


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, list[float], dict[str, torch.Tensor]]:
    """One single-process run for both tests: its initial weights, losses, first gradients."""
    tmp = tmp_path_factory.mktemp("reference")
    losses, grads = _reference(tmp)
    return tmp / "init.pt", losses, grads


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exit_when_done(rank: int, worker, tmp: str, port: int) -> None:
    """Run a rank, then leave without destroying the process group or Python's teardown:
    both join gloo's worker thread while holding the GIL, which that thread may need to
    free its last work item (a deadlock seen in about one DDP run in four). Results are
    in files already; a failure exits 1."""
    try:
        worker(rank, tmp, port)
    except BaseException:  # noqa: BLE001 - reported, then the rank exits non-zero
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    os._exit(0)


def _run(worker, tmp: Path, timeout_s: float = 300.0, world: int = WORLD) -> None:
    """Spawn the ranks; a rank that fails, or ranks still running after ``timeout_s``,
    fail the test instead of hanging the suite."""
    port = _free_port()
    context = mp.spawn(_exit_when_done, args=(worker, str(tmp), port), nprocs=world,
                       join=False)
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{worker.__name__}: ranks still running after {timeout_s:.0f} s")


def _init(rank: int, port: int, world: int = WORLD) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    # A rank that fails must not leave the other waiting on a collective forever.
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    torch.manual_seed(0)


def _local(x: torch.Tensor, rank: int) -> torch.Tensor:
    return x.chunk(WORLD)[rank]


def _global_loss(loss: torch.Tensor) -> float:
    value = loss.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.AVG)
    return value.item()


def _sharded_steps(model: torch.nn.Module, opt: torch.optim.Optimizer,
                   rank: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """STEPS steps of a sharded model on this rank's share of each global batch: the
    global losses and the first step's full (gathered) gradients."""
    losses, grads = [], {}
    for step, (x, y) in enumerate(_batches()[:STEPS]):
        opt.zero_grad()
        loss = model(_local(x, rank), _local(y, rank))
        loss.backward()
        if step == 0:
            grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()
                     if p.grad is not None}
        opt.step()
        losses.append(_global_loss(loss))
    return losses, grads


def _fsdp_worker(rank: int, tmp: str, port: int) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    _init(rank, port)
    tmp_path = Path(tmp)
    # Sharding before transform is refused with the fix in the message.
    early = Llama(_config())
    fully_shard(early)
    with pytest.raises(umup_fx.CaptureError, match="Transform the unsharded model"):
        umup_fx.transform(early, _example())

    # The torchtitan recipe: meta -> transform -> fully_shard per block -> to_empty
    # -> init_ (here: the reference's weights) -> AdamW.
    with torch.device("meta"):
        model = Llama(_config())
    x0, y0 = _example()
    umup_fx.transform(model, (x0.to("meta"), y0.to("meta")))
    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    model.to_empty(device="cpu")
    umup_fx.init_(model)
    for name, buffer in Llama(_config()).named_buffers():  # RoPE tables
        model.get_buffer(name).copy_(buffer)
    full = torch.load(tmp_path / "init.pt")
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True))
    opt = umup_fx.AdamW(model, lr=LR)
    losses, grads = _sharded_steps(model, opt, rank)
    batches = _batches()

    # DCP round trip: save, step, load, step again: the same loss.
    x, y = batches[STEPS]
    model_sd, opt_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": opt_sd}, checkpoint_id=str(tmp_path / "ckpt"))
    opt.zero_grad()
    model(_local(x, rank), _local(y, rank)).backward()
    opt.step()
    after = _global_loss(model(_local(x, rank), _local(y, rank)))
    model_sd, opt_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": opt_sd}
    dcp.load(state, checkpoint_id=str(tmp_path / "ckpt"))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    opt.zero_grad()
    model(_local(x, rank), _local(y, rank)).backward()
    opt.step()
    resumed = _global_loss(model(_local(x, rank), _local(y, rank)))

    # bf16 parameters through MixedPrecisionPolicy: runs, finite.
    torch.manual_seed(0)
    mixed = umup_fx.transform(Llama(_config()), _example())
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in mixed.layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(mixed, mp_policy=policy)
    bf16_loss = mixed(_local(x, rank), _local(y, rank))
    bf16_loss.backward()
    if rank == 0:
        torch.save(
            {"losses": losses, "grads": grads, "after": after, "resumed": resumed,
             "bf16": (bf16_loss.dtype, bf16_loss.item())},
            tmp_path / "fsdp.pt",
        )


def _ddp_worker(rank: int, tmp: str, port: int) -> None:
    from torch.nn.parallel import DistributedDataParallel

    _init(rank, port)
    model = umup_fx.transform(Llama(_config()), _example())
    model.load_state_dict(torch.load(Path(tmp) / "init.pt"))
    ddp = DistributedDataParallel(model)
    x, y = _batches()[0]
    ddp(_local(x, rank), _local(y, rank)).backward()
    if rank == 0:
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        torch.save(grads, Path(tmp) / "ddp.pt")


@pytest.mark.slow
def test_fsdp2_per_block_meta_init_matches_one_process(tmp_path: Path, reference) -> None:
    init, losses, grads = reference
    shutil.copy(init, tmp_path / "init.pt")
    _run(_fsdp_worker, tmp_path)
    got = torch.load(tmp_path / "fsdp.pt")
    assert got["losses"] == pytest.approx(losses, rel=1e-5)
    assert got["grads"].keys() == grads.keys()
    for name, g in grads.items():  # the data-parallel gradient scale (docs/distributed.md)
        torch.testing.assert_close(got["grads"][name], g, rtol=1e-4, atol=1e-6)
    assert got["resumed"] == pytest.approx(got["after"], rel=1e-6)
    dtype, value = got["bf16"]
    assert dtype == torch.bfloat16 and value == pytest.approx(losses[0], rel=0.05)


def test_ddp_weight_gradients_equal_one_process(tmp_path: Path, reference) -> None:
    init, _, grads = reference
    shutil.copy(init, tmp_path / "init.pt")
    _run(_ddp_worker, tmp_path)
    got = torch.load(tmp_path / "ddp.pt")
    assert got.keys() == grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-6)
