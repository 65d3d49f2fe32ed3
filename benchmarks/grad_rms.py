"""Gradient norms of u-muP vs the plain model while training: what a clip threshold means.

Trains the example Llama (2 layers, byte-level stdlib corpus) at two widths, once as
written (standard parametrization, torch AdamW) and once transformed to u-muP
(umup_fx.AdamW), without clipping, and records every step's global gradient norm and
gradient RMS (norm / sqrt(elements)). Writes the table into docs/training.md
(section "grad-rms"). About two minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parent.parent))  # examples/; umup_fx as installed

import umup_fx  # noqa: E402
from benchmarks._doc import command, machine, write_section  # noqa: E402
from examples.data import get_batch, load_corpus  # noqa: E402
from examples.llama import Llama, LlamaConfig  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "training.md"


def revision() -> str:
    """The commit measured, "-dirty" when the working tree had uncommitted changes."""
    out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                         text=True, cwd=ROOT, check=False)
    return out.stdout.strip() or "unknown"


def run(width: int, umup: bool, steps: int, batch: int, seq: int, lr: float) -> tuple[list[float], int]:
    """Every step's global gradient norm (unclipped), and the trainable elements."""
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=256, d_model=width, n_layers=2, n_heads=4))
    data = load_corpus(500_000)
    gen = torch.Generator().manual_seed(0)
    x, y = get_batch(data, batch, seq, gen)
    if umup:
        umup_fx.transform(model, (x, y))
        opt = umup_fx.AdamW(model, lr=lr)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
    norms = []
    for _ in range(steps):
        x, y = get_batch(data, batch, seq, gen)
        opt.zero_grad(set_to_none=True)
        model(x, y).backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norms.append(torch.nn.utils.get_total_norm(grads).item())
        opt.step()
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return norms, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args()
    rows = []
    for width in args.widths:
        for umup, lr in ((False, 2.0**-9), (True, 2.0**0)):
            norms, n = run(width, umup, args.steps, args.batch, args.seq, lr)
            rms = [v / math.sqrt(n) for v in norms]
            later = sorted(rms[10:])
            rows.append(
                f"| {'u-μP' if umup else 'plain (SP)'} | {width} | {n} | {norms[0]:.3g} | "
                f"{rms[0]:.3g} | {statistics.median(later):.3g} | "
                f"{later[int(0.99 * (len(later) - 1))]:.3g} | {max(later):.3g} | "
                f"{max(later) / statistics.median(later):.2f} |"
            )
            print(rows[-1], flush=True)
    body = "\n".join([
        f"Example Llama, 2 layers, batch {args.batch} x {args.seq} bytes, {args.steps} AdamW "
        "steps without clipping (η 2^-9 plain, 2^0 u-μP), seed 0. RMS = global norm / "
        "sqrt(n), n = trainable elements; \"later\" columns are steps 10 onwards.",
        "",
        "| model | width | n | global norm, step 0 | RMS, step 0 | RMS, median later | "
        "RMS, p99 later | RMS, max later | max / median |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Machine: {machine()}. Code: {revision()}. Command: `{command()}`.",
    ])
    write_section("grad-rms", body, DOC)


if __name__ == "__main__":
    main()
