"""FP8 numerics on the GPU: torch._scaled_mm against the simulation, FP8 training against
bf16; into docs/benchmarks.md.

    python benchmarks/fp8_numerics.py                            # GPU: the run in docs/
    python benchmarks/fp8_numerics.py --device cpu --smoke --no-write   # the code path only

1. **Matmul**: ``umup_fx.runtime.fp8.linear`` through ``torch._scaled_mm`` (real FP8 tensor cores)
   and through the simulation (E4M3 / E5M2 rounding, then the ordinary bf16 matmul) on the
   same unit-scale inputs: output, input gradient and weight gradient, as the relative
   error ``||a - b|| / ||b||``. Both paths multiply the same FP8 values, so they differ only
   by accumulation order and the output's bf16 rounding.
2. **Training**: the example Llama rewritten by ``umup_fx.transform`` with and without
   ``fp8=True``, compiled, fp32 weights under bf16 autocast, the same seed and batches of
   the byte corpus, trained for ``--steps`` steps at the demo's η; the final losses and
   their relative difference.

Each part records its error in the table instead of stopping the others: the GPU is
lent rarely, so one failure must not lose the rest of the figures.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parent.parent))  # examples/; umup_fx as installed

import umup_fx  # noqa: E402
from benchmarks._doc import command, machine, write_section  # noqa: E402
from examples.demo import train  # noqa: E402
from examples.llama import Llama, LlamaConfig  # noqa: E402
from umup_fx.runtime import fp8  # noqa: E402
from umup_fx.transfer.corpus import get_batch, load_corpus, train_val_split  # noqa: E402

MATMUL_SHAPES = [(8192, 2048, 2048), (8192, 2048, 5632), (8192, 5632, 2048)]  # M, K, N
SMOKE_SHAPES = [(64, 32, 48)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm())


def _linear_pass(mode: str, x: torch.Tensor, w: torch.Tensor, g: torch.Tensor):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    k, n = x.shape[-1], w.shape[0]
    y = fp8.linear(x, w, out_scale=k**-0.5, grad_input_scale=n**-0.5, mode=mode)
    y.backward(g)
    return y.detach(), x.grad, w.grad


def matmul_rows(device: str, shapes: list[tuple[int, int, int]]) -> list[str]:
    """Relative error of the real FP8 path against the simulation, per shape."""
    real = fp8.has_fp8_matmul(torch.device(device))
    rows = ["| M × K × N | output | input gradient | weight gradient |", "|---|---:|---:|---:|"]
    gen = torch.Generator(device=device).manual_seed(0)
    for m, k, n in shapes:
        x, w, g = (torch.randn(*s, device=device, generator=gen, dtype=torch.bfloat16)
                   for s in ((m, k), (n, k), (m, n)))
        if not real:
            rows.append(f"| {m} × {k} × {n} | no FP8 tensor cores on {device}: not run | | |")
            continue
        a = _linear_pass("scaled_mm", x, w, g)
        b = _linear_pass("simulate", x, w, g)
        rows.append(f"| {m} × {k} × {n} | " + " | ".join(f"{_rel(p, q):.1e}" for p, q in zip(a, b, strict=True))
                    + " |")
    return rows


def _train(args: argparse.Namespace, use_fp8: bool, data: tuple) -> dict:
    train_data, val_data = data
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, d_model=args.d_model, n_layers=args.layers,
                         n_heads=max(1, args.d_model // 64), max_seq_len=args.seq)
    gen = torch.Generator().manual_seed(0)
    x, y = get_batch(train_data, args.batch, args.seq, gen)
    model = umup_fx.transform(Llama(config), (x, y), fp8=use_fp8).to(args.device)
    optimizer = umup_fx.AdamW(model, lr=args.lr)
    step_model = torch.compile(model) if args.device == "cuda" else model
    autocast = torch.autocast(args.device, dtype=torch.bfloat16)

    def forward(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        with autocast:
            return step_model(xb.to(args.device), yb.to(args.device))

    start = time.perf_counter()
    # The demo's loop (warmup + cosine); it stops early, so a diverged run shows as short.
    losses = train(model, optimizer, train_data, args.steps, args.batch, args.seq, gen,
                   step_fn=forward, progress=False)
    every = max(1, args.steps // 5)
    curve = {s: statistics.mean(losses[max(0, s - 10):s])
             for s in range(every, len(losses) + 1, every)}
    seconds = time.perf_counter() - start
    vgen = torch.Generator().manual_seed(1)
    with torch.no_grad(), autocast:
        val = [float(step_model(*(t.to(args.device) for t in
                                  get_batch(val_data, args.batch, args.seq, vgen))))
               for _ in range(8)]
    return {"train": statistics.mean(losses[-20:]), "val": statistics.mean(val),
            "curve": curve, "seconds": seconds}


def training_rows(args: argparse.Namespace) -> list[str]:
    data = train_val_split(load_corpus())
    runs = {name: _train(args, use_fp8, data) for name, use_fp8 in (("bf16", False),
                                                                      ("FP8", True))}
    steps = list(runs["bf16"]["curve"])
    rows = ["| variant | " + " | ".join(f"train loss at {s}" for s in steps)
            + " | final train (last 20) | val | time incl. compile (s) |",
            "|---|" + "---:|" * (len(steps) + 3)]
    for name, r in runs.items():
        rows.append(f"| u-μP {name} | " + " | ".join(f"{r['curve'].get(s, math.nan):.4f}" for s in steps)
                    + f" | {r['train']:.4f} | {r['val']:.4f} | {r['seconds']:.0f} |")
    for key in ("train", "val"):
        rel = abs(runs["FP8"][key] - runs["bf16"][key]) / runs["bf16"][key]
        rows.append(f"\nFP8 against bf16, final {key} loss: {100 * rel:.2f}% apart "
                    f"({'within' if rel <= 0.01 else 'NOT within'} 1%).")
    return rows


def _guarded(part: str, fn) -> list[str]:
    try:
        return fn()
    except Exception as error:  # noqa: BLE001 - recorded in the doc, the other parts go on
        traceback.print_exc()
        return [f"{part} failed: `{type(error).__name__}: {str(error).splitlines()[0][:300]}`"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--lr", type=float, default=1.0, help="the demo's η (docs/transfer.md)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: check the code runs")
    p.add_argument("--section", default="fp8_numerics_gpu")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    if args.smoke:
        args.d_model, args.layers, args.seq, args.batch, args.steps = 64, 2, 32, 2, 10
    shapes = SMOKE_SHAPES if args.smoke else MATMUL_SHAPES
    body = "\n".join([
        f"{machine()}. Command: `{command()}`.",
        "",
        "**`torch._scaled_mm` against the CPU-exact simulation** (`umup_fx.runtime.fp8.linear`, bf16 "
        "inputs of unit scale, relative error `||real - simulated|| / ||simulated||`):",
        "",
        *_guarded("The matmul check", lambda: matmul_rows(args.device, shapes)),
        "",
        f"**Training**: example Llama, d_model {args.d_model}, {args.layers} layers, seq "
        f"{args.seq}, batch {args.batch}, byte corpus, {args.steps} steps at η = {args.lr:g} "
        "(warmup and cosine), fp32 weights under bf16 autocast, compiled on CUDA; FP8 is "
        "`transform(..., fp8=True)` (q/k/v and gate/up, rules §7).",
        "",
        *_guarded("The training comparison", lambda: training_rows(args)),
    ])
    print(body)
    if not args.no_write:
        write_section(args.section, body)


if __name__ == "__main__":
    main()
