"""Training-step time under the engines' layouts: the transformed model against the
original under the same layout, as a ratio; into docs/benchmarks.md.

    python benchmarks/engine_step_time.py            # 2 gloo ranks on this CPU

Layouts (2 ranks): FSDP2 per block + root; FSDP2 per linear, embedding, [norm, lm_head],
block and root (torchtitan's units, and finer); tensor parallel with the Llama plan on a
tiny Hugging Face Llama (the original runs as written under tensor parallel). In each
layout the original and the transformed model run alternately, round by round, on
rank-identical data; a figure is the median over rounds of the mean step (forward,
backward, AdamW) in that round, on rank 0.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.append(str(Path(__file__).resolve().parent.parent))  # examples/; umup_fx as installed

import umup_fx  # noqa: E402
from benchmarks._doc import command, machine, write_section  # noqa: E402

LAYOUTS = ("fsdp2 per block", "fsdp2 per module", "tensor parallel")
PLAN = {"self_attn.q_proj": "colwise", "self_attn.k_proj": "colwise",
        "self_attn.v_proj": "colwise", "self_attn.o_proj": "rowwise",
        "mlp.gate_proj": "colwise", "mlp.up_proj": "colwise", "mlp.down_proj": "rowwise"}


def _model(args: argparse.Namespace) -> nn.Module:
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.width, intermediate_size=args.width * 11 // 4,
        num_hidden_layers=args.layers, num_attention_heads=args.width // 64 or 1,
        num_key_value_heads=max(1, args.width // 128), max_position_embeddings=args.seq,
        use_cache=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def _apply(model: nn.Module, layout: str, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    mesh = init_device_mesh("cpu", (world,))
    inner = model.model
    if layout == "tensor parallel":
        styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
        for block in inner.layers:
            parallelize_module(block, mesh, {k: styles[v]() for k, v in PLAN.items()})
        return
    if layout == "fsdp2 per module":
        fully_shard(inner.embed_tokens, mesh=mesh)
        for block in inner.layers:
            for linear in [m for m in block.modules() if isinstance(m, nn.Linear)]:
                fully_shard(linear, mesh=mesh)
    for block in inner.layers:
        fully_shard(block, mesh=mesh)
    if layout == "fsdp2 per module":
        fully_shard([inner.norm, model.lm_head], mesh=mesh)
    fully_shard(model, mesh=mesh)


def _step(model: nn.Module, opt: torch.optim.Optimizer, call: dict) -> None:
    opt.zero_grad()
    model(**call).loss.backward()
    opt.step()


def _worker(rank: int, args: argparse.Namespace, out: str, port: int) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=args.world,
                            timeout=datetime.timedelta(seconds=600))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // args.world))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
    call = {"input_ids": ids, "labels": ids}
    results = {}
    for layout in args.layouts:
        models = {"original": _model(args)}
        models["u-muP"] = umup_fx.transform(_model(args), (), call, check=False)
        opts = {}
        for name, model in models.items():
            _apply(model, layout, args.world)
            opts[name] = (umup_fx.AdamW(model) if name == "u-muP"
                          else torch.optim.AdamW(model.parameters(), lr=1e-3))

        times: dict[str, list[float]] = {name: [] for name in models}
        for name in models:
            for _ in range(args.warmup):
                _step(models[name], opts[name], call)
        for _ in range(args.rounds):
            for name in models:
                dist.barrier()
                start = time.perf_counter()
                for _ in range(args.steps):
                    _step(models[name], opts[name], call)
                dist.barrier()
                times[name].append((time.perf_counter() - start) / args.steps)
        results[layout] = {name: statistics.median(t) for name, t in times.items()}
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "results.pt")
        mp.spawn(_worker, args=(args, out, port), nprocs=args.world)
        results = torch.load(out)
    rows = ["| layout | original step (ms) | u-muP step (ms) | u-muP / original |",
            "|---|---:|---:|---:|"]
    for layout, t in results.items():
        rows.append(f"| {layout} | {t['original'] * 1e3:.1f} | {t['u-muP'] * 1e3:.1f} "
                    f"| {t['u-muP'] / t['original']:.3f} |")
    body = (f"{machine()}; `{command()}`\n\n"
            f"Hugging Face Llama, width {args.width}, {args.layers} layers, vocab {args.vocab}, "
            f"batch {args.batch} x {args.seq} on each of {args.world} gloo ranks, eager; median "
            f"over {args.rounds} rounds of the mean of {args.steps} steps (forward, backward, "
            "AdamW) after "
            f"{args.warmup} warm-up steps, original and u-muP alternating.\n\n" + "\n".join(rows))
    print(body)
    if not args.no_write:
        write_section("engine_step_time", body)


if __name__ == "__main__":
    main()
