"""Every module call kept: hooks on any submodule fire after transform, and FSDP2 shards
a transformed model at any granularity (torchtitan's layout: the embedding, every
linear, every block, [norm, lm_head], the root), matching one process."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import umup_fx
from examples.llama import Llama, LlamaConfig
from tests.test_distributed import (
    LR,
    STEPS,
    _config,
    _example,
    _global_loss,
    _init,
    _reference,
    _run,
    _sharded_steps,
)
from tests.tiny_models import hf_llama


def _called(model: nn.Module, *args) -> list[str]:
    """The modules a forward calls, in call order, by their forward pre-hooks."""
    seen: list[str] = []
    handles = [m.register_forward_pre_hook(lambda _m, _a, name=name: seen.append(name))
               for name, m in model.named_modules() if name]
    try:
        model(*args)
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("family", ["llama", "hf_llama"])
def test_every_submodule_the_original_calls_is_called_after_transform(family: str) -> None:
    torch.manual_seed(0)
    x = torch.randint(0, 256, (2, 8))
    if family == "llama":
        make = lambda: Llama(LlamaConfig(d_model=32, n_layers=3, n_heads=2))  # noqa: E731
        args = (x, x)
    else:
        make = lambda: hf_llama(layers=3)  # noqa: E731
        args = (x,)
    original = _called(make(), *args)
    model = umup_fx.transform(make(), args, check=False)
    # Only weightless modules whose op the rewrite fused (a gated unit's act_fn) are not.
    assert all(not list(model.get_submodule(p).parameters()) for p in model.inlined_calls)
    assert _called(model, *args) == [p for p in original if p not in model.inlined_calls]
    assert len(model.inlined_calls) <= 3
    assert "layers.2.attn.q_proj" in original or "model.layers.2.self_attn.q_proj" in original


def test_hooks_registered_before_and_after_transform_fire_and_can_change_the_output() -> None:
    torch.manual_seed(0)
    model = Llama(LlamaConfig(d_model=32, n_layers=2, n_heads=2))
    x = torch.randint(0, 256, (2, 8))
    before: list[tuple] = []
    model.layers[1].mlp.down_proj.register_forward_hook(
        lambda _m, _a, out: before.append(tuple(out.shape)))
    umup_fx.transform(model, (x,), check=False)
    before.clear()  # the capture ran the hook too, on its stand-in tensors
    logits = model(x)
    assert before == [(2, 8, 32)]
    # A hook added after transform sees the u-muP output and can replace it.
    handle = model.lm_head.register_forward_hook(lambda _m, _a, out: torch.zeros_like(out))
    assert model(x).abs().max() == 0
    handle.remove()
    torch.testing.assert_close(model(x), logits)


def _per_module_worker(rank: int, tmp: str, port: int) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    _init(rank, port)
    with torch.device("meta"):
        model = Llama(_config())
    x0, y0 = _example()
    umup_fx.transform(model, (x0.to("meta"), y0.to("meta")))
    # torchtitan's units, and finer: the embedding, every linear, every block,
    # [norm, lm_head] as one unit, the root.
    fully_shard(model.embed)
    for block in model.layers:
        for linear in [m for m in block.modules() if isinstance(m, nn.Linear)]:
            fully_shard(linear)
        fully_shard(block)
    fully_shard([model.norm, model.lm_head])
    fully_shard(model)
    assert isinstance(model.embed.weight, DTensor)
    model.to_empty(device="cpu")
    umup_fx.init_(model)
    for name, buffer in Llama(_config()).named_buffers():  # RoPE tables
        model.get_buffer(name).copy_(buffer)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, torch.load(Path(tmp) / "init.pt"),
                         options=StateDictOptions(full_state_dict=True))
    losses, grads = _sharded_steps(model, umup_fx.AdamW(model, lr=LR), rank)
    if rank == 0:
        torch.save({"losses": losses, "grads": grads}, Path(tmp) / "fsdp.pt")


@pytest.mark.slow
def test_fsdp2_on_every_linear_embedding_and_head_matches_one_process(tmp_path: Path) -> None:
    losses, grads = _reference(tmp_path)
    _run(_per_module_worker, tmp_path)
    got = torch.load(tmp_path / "fsdp.pt")
    assert got["losses"] == pytest.approx(losses, rel=1e-5)
    assert got["grads"].keys() == grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(got["grads"][name], g, rtol=1e-4, atol=1e-6)
    shutil.rmtree(tmp_path, ignore_errors=True)


def _hf_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 256, (4, 16), generator=gen),) * 2 for _ in range(STEPS)]


def _hf_call() -> dict[str, torch.Tensor]:
    x, y = _hf_batches()[0]
    return {"input_ids": x, "labels": y}


def _hf_run(model: nn.Module, shard: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
            ) -> tuple[list[float], dict]:
    """STEPS AdamW steps (on ``shard`` of each batch); the global losses and the first
    step's full gradients."""
    opt = umup_fx.AdamW(model, lr=LR)
    losses, grads = [], {}
    for step, (x, y) in enumerate(_hf_batches()):
        opt.zero_grad()
        loss = model(input_ids=shard(x), labels=shard(y)).loss
        loss.backward()
        if step == 0:
            grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad)
                     for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        if hasattr(loss, "full_tensor"):  # loss_parallel: a replicated DTensor
            loss = loss.full_tensor()
        losses.append(_global_loss(loss) if torch.distributed.is_initialized() else loss.item())
    return losses, grads


def _hf_matches_one_process(tmp_path: Path, worker: Callable, world: int = 2) -> None:
    """``worker``'s ranks train the tiny HF Llama from one transformed model's weights
    (saved to init.pt) and write result.pt: their losses (rel 1e-5) and first full
    gradients (rel 1e-4; atol 1e-5 for the all-reduces' other summation order) are one
    process's."""
    torch.manual_seed(0)
    model = umup_fx.transform(hf_llama(layers=2), (), _hf_call(), check=False)
    torch.save(model.state_dict(), tmp_path / "init.pt")
    losses, grads = _hf_run(model)
    _run(worker, tmp_path, world=world)
    got = torch.load(tmp_path / "result.pt")
    assert got["losses"] == pytest.approx(losses, rel=1e-5)
    assert got["grads"].keys() == grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(got["grads"][name], g, rtol=1e-4, atol=1e-5)


TP_PLAN = {  # the standard Llama plan, by the original model's module names
    "self_attn.q_proj": "colwise", "self_attn.k_proj": "colwise",
    "self_attn.v_proj": "colwise", "self_attn.o_proj": "rowwise",
    "mlp.gate_proj": "colwise", "mlp.up_proj": "colwise", "mlp.down_proj": "rowwise",
}


def _tp_worker(rank: int, tmp: str, port: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    _init(rank, port)
    model = umup_fx.transform(hf_llama(layers=2), (), _hf_call(), check=False)
    model.load_state_dict(torch.load(Path(tmp) / "init.pt"))
    mesh = init_device_mesh("cpu", (2,))
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    for block in model.model.layers:
        parallelize_module(block, mesh, {k: styles[v]() for k, v in TP_PLAN.items()})
    assert isinstance(model.model.layers[0].self_attn.q_proj.weight, DTensor)
    losses, grads = _hf_run(model)
    if rank == 0:
        torch.save({"losses": losses, "grads": grads}, Path(tmp) / "result.pt")


@pytest.mark.slow
def test_tensor_parallel_with_the_llama_plan_matches_one_process(tmp_path: Path) -> None:
    _hf_matches_one_process(tmp_path, _tp_worker)


def _fsdp_tp_worker(rank: int, tmp: str, port: int) -> None:
    """A 2-D mesh: FSDP2 over data-parallel pairs, tensor parallel inside each."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    _init(rank, port, world=4)
    model = umup_fx.transform(hf_llama(layers=2), (), _hf_call(), check=False)
    model.load_state_dict(torch.load(Path(tmp) / "init.pt"))
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    for block in model.model.layers:
        parallelize_module(block, mesh["tp"], {k: styles[v]() for k, v in TP_PLAN.items()})
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    dp = mesh["dp"].get_local_rank()
    losses, grads = _hf_run(model, lambda t: t.chunk(2)[dp])
    if rank == 0:
        torch.save({"losses": losses, "grads": grads}, Path(tmp) / "result.pt")


@pytest.mark.slow
def test_fsdp2_times_tensor_parallel_on_a_2d_mesh_matches_one_process(tmp_path: Path) -> None:
    _hf_matches_one_process(tmp_path, _fsdp_tp_worker, world=4)


def _sp_plan(loss_parallel: bool = False) -> tuple[dict, dict, dict]:
    """Sequence parallel around the Llama plan: the residual stream sharded on the
    sequence axis between blocks, norms on the shards, all-gathered into attention and
    MLP, reduce-scattered out of o / down (torchtitan's layout)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
    )

    inner = {"embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
             "norm": SequenceParallel()}
    head = {"lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1),
                                       use_local_output=False) if loss_parallel else
            ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())}
    block = {
        "input_layernorm": SequenceParallel(),
        "self_attn": PrepareModuleInput(input_kwarg_layouts={"hidden_states": Shard(1)},
                                        desired_input_kwarg_layouts={"hidden_states": Replicate()}),
        "self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
        "post_attention_layernorm": SequenceParallel(),
        "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1)),
    }
    return inner, head, block


def _sp_worker(rank: int, tmp: str, port: int) -> None:
    import contextlib

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import loss_parallel, parallelize_module

    _init(rank, port)
    model = umup_fx.transform(hf_llama(layers=2), (), _hf_call(), check=False)
    model.load_state_dict(torch.load(Path(tmp) / "init.pt"))
    mesh = init_device_mesh("cpu", (2,))
    sharded_loss = (Path(tmp) / "loss_parallel").exists()
    inner, head, block = _sp_plan(sharded_loss)
    parallelize_module(model.model, mesh, inner)
    parallelize_module(model, mesh, head)
    for layer in model.model.layers:
        parallelize_module(layer, mesh, block)
    with loss_parallel() if sharded_loss else contextlib.nullcontext():
        losses, grads = _hf_run(model)
    if rank == 0:
        torch.save({"losses": losses, "grads": grads}, Path(tmp) / "result.pt")


@pytest.mark.slow
@pytest.mark.parametrize("sharded_loss", [False, True], ids=["replicated_loss", "loss_parallel"])
def test_sequence_parallel_matches_one_process(tmp_path: Path, sharded_loss: bool) -> None:
    # HF's Llama as written does not run under this plan (it takes its positions from the
    # sharded embeddings' length); the transformed graphs take sizes from input_ids.
    # loss_parallel: the logits stay sharded over the vocabulary into the loss.
    if sharded_loss:
        (tmp_path / "loss_parallel").touch()
    _hf_matches_one_process(tmp_path, _sp_worker)


@pytest.mark.parametrize("family", ["GPT-2", "Gemma", "GPT-NeoX", "OLMo2", "Qwen3", "BERT"])
def test_hf_families_call_every_module_with_weights(family: str) -> None:
    # Tied embeddings (GPT-2, Gemma), parallel residual branches (GPT-NeoX), norms on the
    # branch side shared by two reads (OLMo2), q / k norms (Qwen3), residual adds inside a
    # block's submodules with the skip passed in (BERT's attention output): each weight's
    # module is its own call, and the check stays quiet.
    pytest.importorskip("transformers")
    import warnings

    from tests.families import FAMILIES

    case = FAMILIES[family]()
    with warnings.catch_warnings():
        warnings.simplefilter("error", umup_fx.InlinedCallWarning)
        warnings.simplefilter("error", umup_fx.ScaleWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
        umup_fx.transform(case.model, case.args, case.kwargs)
    weighty = [p for p in case.model.inlined_calls
               if list(case.model.get_submodule(p).parameters())]
    assert weighty == []
