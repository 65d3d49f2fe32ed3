"""Learning-rate transfer across width: sweep the u-muP eta at two widths of the example Llama.

    python benchmarks/lr_sweep.py                # the run in docs/transfer.md (~13 min, 2-core CPU)
    python benchmarks/lr_sweep.py --widths 128 256 512 --steps 300 --lrs 0.125 0.25 0.5 1
    python benchmarks/lr_sweep.py --no-write     # print only, leave docs/ alone

For each width (4 layers, d_head 32, so heads = d_model // 32) and each eta it builds the
example Llama, rewrites it with ``umup_fx.transform``, trains it with ``umup_fx.AdamW`` on
the byte-level stdlib corpus with ``examples/demo.py``'s loop (same seed, same batches, warmup
+ cosine schedule), and reports the final train loss (mean of the last 10 steps) and the
validation loss. Under u-muP the best eta should not move with width. Prints one line per
run as it goes, then a markdown table and the best eta per width (by validation loss),
and writes them (with the machine, the command and the time per step) into the
``lr_sweep`` section of ``docs/transfer.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parent.parent))  # examples/; umup_fx as installed

import umup_fx  # noqa: E402
from benchmarks._doc import command as run_command  # noqa: E402
from benchmarks._doc import machine, write_section  # noqa: E402
from examples.data import load_corpus, train_val_split  # noqa: E402
from examples.demo import CORPUS_BYTES, batch, evaluate, make_model, train  # noqa: E402


def run_one(width: int, lr: float, args: argparse.Namespace, train_data, val_data) -> dict:
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    example = batch(train_data, args.batch, args.seq, gen)
    model = make_model(width, args.layers, width // args.d_head, example)
    optimizer = umup_fx.AdamW(model, lr=lr)
    start = time.perf_counter()
    losses = train(
        model, optimizer, train_data, args.steps, args.batch, args.seq, gen, progress=False
    )
    elapsed = time.perf_counter() - start
    diverged = len(losses) < args.steps or not math.isfinite(losses[-1])
    tail = losses[-10:]
    train_loss = float("nan") if diverged else sum(tail) / len(tail)
    val_loss = (
        float("nan")
        if diverged
        else evaluate(
            model, val_data, args.batch, args.seq, n_batches=args.val_batches, seed=args.seed + 1
        )
    )
    return {"width": width, "lr": lr, "train": train_loss, "val": val_loss, "seconds": elapsed}


def lr_label(lr: float) -> str:
    exp = math.log2(lr)
    return f"2^{exp:g}" if exp == round(exp) else f"{lr:g}"


def table(results: list[dict], widths: list[int], lrs: list[float]) -> str:
    cell = {(r["width"], r["lr"]): r for r in results}
    head = "| eta | " + " | ".join(f"d={w} train | d={w} val" for w in widths) + " |"
    rule = "|---|" + "---:|---:|" * len(widths)
    rows = [head, rule]
    best = {
        w: min(
            (r for r in results if r["width"] == w and math.isfinite(r["val"])),
            key=lambda r: r["val"],
            default=None,
        )
        for w in widths
    }
    for lr in lrs:
        cells = []
        for w in widths:
            r = cell.get((w, lr))
            if r is None or not math.isfinite(r["val"]):
                cells += ["diverged" if r else "-", "-"]
                continue
            mark = "**" if best[w] is r else ""
            cells += [f"{r['train']:.4f}", f"{mark}{r['val']:.4f}{mark}"]
        rows.append(f"| {lr_label(lr)} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--widths", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--lrs", type=float, nargs="+", default=[2.0**e for e in range(-4, 3)])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-head", type=int, default=32)
    parser.add_argument("--val-batches", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--no-write", action="store_true", help="do not update docs/")
    args = parser.parse_args()

    print(
        f"torch {torch.__version__}, python {platform.python_version()}, "
        f"{torch.get_num_threads()} threads; steps {args.steps}, batch {args.batch}, "
        f"seq {args.seq}, layers {args.layers}, d_head {args.d_head}",
        flush=True,
    )
    train_data, val_data = train_val_split(load_corpus(CORPUS_BYTES))
    results = []
    start = time.perf_counter()
    for width in args.widths:
        for lr in args.lrs:
            r = run_one(width, lr, args, train_data, val_data)
            results.append(r)
            print(
                f"d_model {width:4d}  eta {lr_label(lr):>5}  train {r['train']:.4f}  "
                f"val {r['val']:.4f}  ({r['seconds']:.0f}s)",
                flush=True,
            )
    total = time.perf_counter() - start
    lines = [table(results, args.widths, args.lrs), ""]
    for width in args.widths:
        ok = [r for r in results if r["width"] == width and math.isfinite(r["val"])]
        if ok:
            best = min(ok, key=lambda r: r["val"])
            lines.append(
                f"- best eta at d_model {width}: **{lr_label(best['lr'])}** (val {best['val']:.4f})"
            )
        else:
            lines.append(f"- best eta at d_model {width}: none (all diverged)")
    diverged = sum(not math.isfinite(r["val"]) for r in results)
    lines.append(f"- diverged runs: {diverged} of {len(results)}")
    per_step = ", ".join(
        f"{statistics.median(r['seconds'] for r in results if r['width'] == w) / args.steps:.3f} s"
        f" at d_model {w}"
        for w in args.widths
    )
    lines.append(f"- time per training step (median over eta): {per_step}; "
                 f"whole sweep {total / 60:.1f} min")
    text = "\n".join(lines)
    print(f"\n{text}\n")
    if not args.no_write:
        command = run_command()
        settings = (
            f"steps {args.steps}, batch {args.batch} x {args.seq} bytes, {args.layers} layers, "
            f"d_head {args.d_head}, seed {args.seed}, {args.val_batches} validation batches"
        )
        write_section(
            "lr_sweep",
            f"{machine()}; `{command}`; {settings}\n\n{text}",
            doc=Path(__file__).resolve().parent.parent / "docs" / "transfer.md",
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"args": vars(args) | {"json": str(args.json)}, "results": results}, indent=1
            )
        )


if __name__ == "__main__":
    main()
