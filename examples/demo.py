"""Train the example Llama with u-muP on a byte-level corpus, from a plain PyTorch model.

    python examples/demo.py

Builds ``examples/llama.py``'s Llama (d_model 128, 4 layers, 4 heads), rewrites it with
``umup_fx.transform`` (example inputs: one training batch ``(x, y)``), prints the u-muP
plan (each parameter's role, fan-in / fan-out, LR factor, FP8), then trains it with
``umup_fx.AdamW`` (linear warmup over the first 10% of steps, cosine decay to 10% of
the peak) on the Python standard library's own source read as bytes (``examples/data.py``:
no download). It reports validation loss before and after training and the final
train / validation loss. The defaults (200 steps of batch 16 x 128 bytes) take about
a minute on a 2-core CPU (docs/benchmarks.md has the measured training time); runs are seeded and deterministic.

The default ``--lr`` is ``umup_fx.AdamW``'s own default eta, 2**0 = 1
(``umup_fx.DEFAULT_LR``): the best value of the project's width sweeps
(``docs/transfer.md``). With u-muP the optimal learning rate is meant to stay put as
the model widens, so bigger runs keep it. For example::

    python examples/demo.py --d-model 512 --heads 16 --steps 1000   # wider (d_head 32)
    python examples/demo.py --layers 8 --seq 256 --batch 32          # deeper, longer
    python examples/demo.py --fp8 --compile                          # simulated FP8, torch.compile

(``--seq`` is at most 256, the example model's ``max_seq_len``.)
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.append(str(Path(__file__).resolve().parent.parent))  # examples/; umup_fx as installed

import umup_fx  # noqa: E402
from examples.data import get_batch, load_corpus, train_val_split  # noqa: E402
from examples.llama import Llama, LlamaConfig  # noqa: E402
from umup_fx.transfer.sweep import lr_schedule  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # tqdm is the optional "demo" extra
    tqdm = None

DEFAULT_LR = umup_fx.DEFAULT_LR["umup"]  # umup_fx.AdamW's default eta (docs/transfer.md)
CORPUS_BYTES = 2_000_000


def batch(
    data: Tensor, batch_size: int, seq_len: int, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    """One training batch ``(x, y)`` (``examples.data.get_batch``)."""
    return get_batch(data, batch_size, seq_len, gen)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Tensor,
    batch_size: int,
    seq_len: int,
    n_batches: int = 16,
    seed: int = 0,
) -> float:
    """Mean loss over ``n_batches`` fixed (seeded) batches of ``data``."""
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    total = 0.0
    for _ in range(n_batches):
        x, y = batch(data, batch_size, seq_len, gen)
        total += model(x, y).item()
    model.train(was_training)
    return total / n_batches


def make_model(
    d_model: int, layers: int, heads: int, example: tuple[Tensor, Tensor], fp8: bool = False
) -> nn.Module:
    """The example Llama, rewritten into u-muP (same parameter names)."""
    config = LlamaConfig(vocab_size=256, d_model=d_model, n_layers=layers, n_heads=heads)
    return umup_fx.transform(Llama(config), example, fp8="simulate" if fp8 else "off")


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Tensor,
    steps: int,
    batch_size: int,
    seq_len: int,
    gen: torch.Generator,
    *,
    step_fn=None,
    progress: bool = True,
) -> list[float]:
    """Train ``steps`` steps with the warmup + cosine schedule; return each step's loss.

    ``step_fn(x, y)`` runs the forward (default ``model``, e.g. a ``torch.compile``d
    wrapper of it). Stops early, returning the losses so far, if the loss is not finite.
    """
    forward = model if step_fn is None else step_fn
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(steps))
    model.train()
    losses: list[float] = []
    bar = tqdm(range(steps), desc="train", unit="step") if progress and tqdm else None
    log_every = max(1, steps // 10)
    for step in bar if bar is not None else range(steps):
        x, y = batch(data, batch_size, seq_len, gen)
        lr_mult = sched.get_last_lr()[0] / sched.base_lrs[0]
        loss = forward(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sched.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            if progress:
                print(f"loss is {losses[-1]} at step {step}: stopping")
            break
        if bar is not None:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", lr_mult=f"{lr_mult:.2f}")
        elif progress and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:5d}  loss {losses[-1]:.4f}  lr x{lr_mult:.2f}", flush=True)
    if bar is not None:
        bar.close()
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument(
        "--lr", type=float, default=DEFAULT_LR, help="peak u-muP eta (default %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fp8", action="store_true", help="simulated FP8 matmuls (fp8='simulate')")
    parser.add_argument("--compile", action="store_true", help="wrap the model in torch.compile")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    train_data, val_data = train_val_split(load_corpus(CORPUS_BYTES))
    gen = torch.Generator().manual_seed(args.seed)
    example = batch(train_data, args.batch, args.seq, gen)
    model = make_model(args.d_model, args.layers, args.heads, example, fp8=args.fp8)
    print(model.umup_plan)
    print()
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(
        f"{n_params / 1e6:.2f}M trainable parameters; {len(train_data):,} train / "
        f"{len(val_data):,} val bytes; eta = {args.lr:g}"
    )

    optimizer = umup_fx.AdamW(model, lr=args.lr)  # reads model.umup_plan: build before compiling
    step_fn = torch.compile(model) if args.compile else model

    eval_kw = dict(batch_size=args.batch, seq_len=args.seq, seed=args.seed + 1)
    print(f"val loss at start: {evaluate(step_fn, val_data, **eval_kw):.4f}")
    start = time.perf_counter()
    losses = train(
        model, optimizer, train_data, args.steps, args.batch, args.seq, gen, step_fn=step_fn
    )
    elapsed = time.perf_counter() - start
    val = evaluate(step_fn, val_data, **eval_kw)
    tail = losses[-10:]
    print(f"trained {len(losses)} steps in {elapsed:.1f}s")
    print(f"final train loss (mean of last {len(tail)} steps): {sum(tail) / len(tail):.4f}")
    print(f"final val loss: {val:.4f}  (uniform over bytes: {math.log(256):.4f})")


if __name__ == "__main__":
    main()
