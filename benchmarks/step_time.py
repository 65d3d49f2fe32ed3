"""Training-step time and memory: original vs u-muP, eager and compiled; into docs/.

    python benchmarks/step_time.py --kernels               # CPU defaults (the run in docs/)
    bash benchmarks/gpu_suite.sh 1b mlp                    # the GPU runs (~1B Llama, SwiGLU)

One process, variants interleaved round by round (so drift and thermal effects hit all
of them alike); each figure is the median over rounds of the mean step time in that
round. A step is forward + backward + AdamW step. Prints a markdown table and, unless
``--no-write``, writes it with the machine and the command into the ``--section``
section of ``docs/benchmarks.md``. ``--kernels`` also counts the kernels Inductor
generates for one compiled training step of a small example Llama, original vs u-muP.
Transform time is ``benchmarks/transform_time.py``'s.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parent.parent))  # examples/; umup_fx as installed

import umup_fx  # noqa: E402
from benchmarks._doc import command as run_command  # noqa: E402
from benchmarks._doc import machine, write_section  # noqa: E402
from examples.llama import Llama, LlamaConfig  # noqa: E402


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _config(args: argparse.Namespace) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers,
        n_heads=max(1, args.d_model // 64), max_seq_len=args.seq, d_ff=args.d_ff,
    )


class _MLPBlock(torch.nn.Module):
    """One pre-norm SwiGLU block with its residual: the FP8 microbenchmark."""

    def __init__(self, d: int, d_ff: int) -> None:
        super().__init__()
        self.norm = torch.nn.RMSNorm(d)
        self.gate = torch.nn.Linear(d, d_ff, bias=False)
        self.up = torch.nn.Linear(d, d_ff, bias=False)
        self.down = torch.nn.Linear(d_ff, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return x + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))


def _torchao_float8(model: torch.nn.Module) -> torch.nn.Module:
    from torchao.float8 import convert_to_float8_training  # optional, GPU benchmark only

    def eligible(module: torch.nn.Module, fqn: str) -> bool:
        # Same layers u-muP casts (q/k/v, gate/up), for a like-for-like comparison.
        ok = isinstance(module, torch.nn.Linear) and all(
            d % 16 == 0 for d in module.weight.shape
        )
        return ok and any(k in fqn for k in ("q_proj", "k_proj", "v_proj", "gate", "up"))

    return convert_to_float8_training(model, module_filter_fn=eligible)


def _variant(args: argparse.Namespace, kind: str, compiled: bool) -> Callable[[], None]:
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    if args.mlp:
        model = _MLPBlock(args.d_model, args.d_ff or 4 * args.d_model).to(args.device, dtype)
        x = torch.randn(args.batch, args.seq, args.d_model, device=args.device, dtype=dtype)
        inputs: tuple = (x,)
        loss_of = lambda out: out.float().pow(2).mean()  # noqa: E731 - a stand-in loss
    else:
        model = Llama(_config(args)).to(args.device, dtype)
        x = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device)
        y = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device)
        inputs = (x, y)
        loss_of = lambda out: out  # noqa: E731 - the model returns its loss
    if kind in ("original", "torchao float8"):
        if kind == "torchao float8":
            model = _torchao_float8(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    else:
        model = umup_fx.transform(model, inputs, fp8="auto" if kind == "u-muP fp8" else "off")
        opt = umup_fx.AdamW(model, lr=1e-4)
    step_model = torch.compile(model) if compiled else model

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_of(step_model(*inputs)).backward()
        opt.step()

    return step


def bench_steps(args: argparse.Namespace) -> str:
    kinds = ["original", "u-muP"] + (["u-muP fp8"] if args.fp8 else [])
    variants = {}
    modes = (True,) if args.compiled_only else (False, True)
    notes = []
    if args.torchao:
        try:
            import torchao.float8  # noqa: F401 - optional, GPU benchmark only
            kinds.append("torchao float8")
        except ImportError as error:  # the GPU image may lack it: measure the rest
            notes.append(f"torchao float8 not run: {error}.")
    for compiled in modes:
        for kind in kinds:
            name = f"{kind} ({'compiled' if compiled else 'eager'})"
            variants[name] = _variant(args, kind, compiled)
            for _ in range(args.warmup):  # compile and warm up before timing anything
                variants[name]()
            _sync(args.device)
    times: dict[str, list[float]] = {n: [] for n in variants}
    peak: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, step in variants.items():
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
                resident = torch.cuda.memory_allocated()
            _sync(args.device)
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            _sync(args.device)
            times[name].append((time.perf_counter() - start) / args.steps)
            if args.device == "cuda":
                # Every variant's model stays resident, so the step's own peak is the
                # part above what was allocated before it (activations, grads, temporaries).
                step_peak = (torch.cuda.max_memory_allocated() - resident) / 2**30
                peak[name] = max(peak.get(name, 0.0), step_peak)
    med = {n: statistics.median(t) for n, t in times.items()}
    what = "SwiGLU MLP block" if args.mlp else f"example Llama, {args.layers} layers"
    lines = [
        f"{what}, {args.device}, {args.dtype}, d_model {args.d_model}, d_ff "
        f"{args.d_ff or 'default'}, seq {args.seq}, batch {args.batch}, vocab {args.vocab}; "
        f"median over {args.rounds} rounds of the mean of {args.steps} steps, after "
        f"{args.warmup} warm-up steps (which include compilation)",
        f"(1-minute load average at the end: {os.getloadavg()[0]:.1f}). Peak memory is the "
        "step's own: the peak during the step above what was allocated before it.",
        *notes,
        "",
        "| variant | median step (ms) | spread (min–max, ms) | vs original, same mode "
        "| vs u-muP, same mode | step peak memory (GiB) | vs original |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, t in med.items():
        mode = name.split(" (")[1]
        base, umup = med[f"original ({mode}"], med[f"u-muP ({mode}"]
        mem, mem_ratio = "n/a (CPU)", "-"
        if name in peak:
            mem, mem_ratio = f"{peak[name]:.2f}", f"{peak[name] / peak[f'original ({mode}']:.3f}"
        spread = f"{min(times[name]) * 1e3:.1f}–{max(times[name]) * 1e3:.1f}"
        lines.append(f"| {name} | {t * 1e3:.1f} | {spread} | {t / base:.3f} | {t / umup:.3f} "
                     f"| {mem} | {mem_ratio} |")
    return "\n".join(lines)


def count_kernels(d_model: int = 64, layers: int = 2) -> str:
    """Kernels in the code Inductor generates for one compiled training step (fwd + bwd)."""
    from torch._inductor.utils import run_and_get_code

    counts = {}
    for kind in ("original", "u-muP"):
        torch.manual_seed(0)
        torch._dynamo.reset()
        config = LlamaConfig(vocab_size=256, d_model=d_model, n_layers=layers,
                             n_heads=max(1, d_model // 32), max_seq_len=64)
        model = Llama(config)
        x = torch.randint(0, 256, (2, 64))
        y = torch.randint(0, 256, (2, 64))
        if kind == "u-muP":
            model = umup_fx.transform(model, (x, y))
        compiled = torch.compile(model)
        _, code = run_and_get_code(lambda m=compiled, x=x, y=y: m(x, y).backward())
        text = "\n".join(code)
        generated = set(re.findall(r"^(\w+) = async_compile\.\w+\(", text, re.MULTILINE))
        library = len(re.findall(r"\b(?:extern_kernels|torch\.ops\.\w+)\.\w+(?:\.\w+)?\(", text))
        counts[kind] = (len(generated), library, len(code))
    lines = [
        f"Kernels of one compiled training step (forward + backward), example Llama, d_model "
        f"{d_model}, {layers} layers, batch 2 x 64, CPU Inductor, counted in the code "
        "`torch._inductor.utils.run_and_get_code` returns:",
        "",
        "| variant | generated kernels | library calls (`extern_kernels.*`, `torch.ops.*`) "
        "| generated modules |",
        "|---|---:|---:|---:|",
        *[f"| {k} | {g} | {lib} | {n} |" for k, (g, lib, n) in counts.items()],
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="steps per round and variant")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--d-ff", type=int, default=None)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--fp8", action="store_true", help="add the u-muP FP8 variant")
    p.add_argument("--torchao", action="store_true", help="add torchao float8 (tensorwise)")
    p.add_argument("--mlp", action="store_true", help="benchmark one SwiGLU block instead")
    p.add_argument("--compiled-only", action="store_true")
    p.add_argument("--kernels", action="store_true",
                   help="also count Inductor's kernels for a small example Llama (CPU)")
    p.add_argument("--section", default="step_time",
                   help="the section of docs/benchmarks.md to write (default %(default)s)")
    p.add_argument("--no-write", action="store_true", help="do not update docs/")
    args = p.parse_args()
    load = os.getloadavg()[0]  # other work on the machine skews the timings
    text = bench_steps(args)
    if args.kernels:
        text += "\n\n" + count_kernels()
    print(f"\n{text}")
    if not args.no_write:
        command = run_command()
        write_section(args.section, f"{machine()}; load average at start {load:.1f}; "
                      f"`{command}`\n\n{text}")


if __name__ == "__main__":
    main()
