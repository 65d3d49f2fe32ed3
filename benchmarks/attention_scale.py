"""What the fixed attention scale costs against the length-dependent one (rules §3).

    python benchmarks/attention_scale.py              # the run in docs/benchmarks.md (~5 min, 2-core CPU)
    python benchmarks/attention_scale.py --steps 60 --no-write

umup_fx fixes the SDPA output scale ``s`` at a reference key length (the example
inputs'), so a position's output does not depend on how many positions follow it. The
reference library reads ``S`` at run time instead. This script trains the example Llama
(byte-level stdlib corpus, ``umup_fx.AdamW``, ``examples/demo.py``'s loop and schedule)
under both, with the same seed and batches, in three settings:

- one training length equal to the reference (the two rules are the same computation);
- one training length 8x the reference (the example inputs were short);
- lengths drawn per step from 1/4 to 1x the reference (packing-free variable lengths).

The length-dependent runs are the same transformed model with the reference length
removed from every SDPA call (``seq_len=None``: ``S`` read from the call). It reports
the final train loss (mean of the last 10 steps) and the validation loss at the
reference length and at 1/4 of it, and writes the table into the ``attention_scale``
section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parent.parent))  # examples/; umup_fx as installed

import umup_fx  # noqa: E402
from benchmarks._doc import command, machine, write_section  # noqa: E402
from examples.data import load_corpus, train_val_split  # noqa: E402
from examples.demo import batch, evaluate, make_model  # noqa: E402
from umup_fx.runtime import ops  # noqa: E402
from umup_fx.transfer.sweep import lr_schedule  # noqa: E402


def length_dependent(model: torch.nn.Module) -> int:
    """Drop the reference length from every SDPA call: ``s`` from the run-time ``S``."""
    changed = 0
    for gm in model.region_graphs().values():
        for node in gm.graph.nodes:
            if node.target is ops.scaled_dot_product_attention and "seq_len" in node.kwargs:
                node.kwargs = {**node.kwargs, "seq_len": None}
                changed += 1
        gm.recompile()
    return changed


def run(setting: str, rule: str, args: argparse.Namespace, train_data, val_data) -> dict:
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    ref = args.seq // 8 if setting == "train 8x ref" else args.seq
    model = make_model(args.width, args.layers, args.width // 32, batch(train_data, args.batch, ref, gen))
    if rule == "length-dependent" and length_dependent(model) == 0:
        raise RuntimeError("no SDPA call carries a reference length; nothing to compare")
    opt = umup_fx.AdamW(model, lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(args.steps))
    lengths = torch.randint(args.seq // 4, args.seq + 1, (args.steps,), generator=gen)
    losses = []
    for step in range(args.steps):
        seq = int(lengths[step]) if setting == "variable lengths" else args.seq
        x, y = batch(train_data, args.batch, seq, gen)
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    val = {n: evaluate(model, val_data, args.batch, n, n_batches=8, seed=args.seed + 1)
           for n in (args.seq, args.seq // 4)}
    return {"setting": setting, "rule": rule, "ref": ref, "train": sum(losses[-10:]) / len(losses[-10:]),
            "val": val[args.seq], "val_short": val[args.seq // 4]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128, help="training length (the reference)")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2**-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    train_data, val_data = train_val_split(load_corpus(1_000_000))
    rows = []
    for setting in ("train at ref", "train 8x ref", "variable lengths"):
        for rule in ("fixed (umup_fx)", "length-dependent"):
            r = run(setting, rule, args, train_data, val_data)
            rows.append(r)
            print(f"{setting:18} {rule:18} ref {r['ref']:4d}  train {r['train']:.4f}  "
                  f"val@{args.seq} {r['val']:.4f}  val@{args.seq // 4} {r['val_short']:.4f}", flush=True)
    table = [
        f"| setting | attention scale | reference S | train loss | val loss @ {args.seq} "
        f"| val loss @ {args.seq // 4} |",
        "|---|---|---|---|---|---|",
        *(f"| {r['setting']} | {r['rule']} | {r['ref']} | {r['train']:.4f} | {r['val']:.4f} "
          f"| {r['val_short']:.4f} |" for r in rows),
    ]
    body = "\n".join([
        "### The fixed attention scale against the length-dependent one",
        "",
        f"Example Llama, d_model {args.width}, {args.layers} layers, d_head 32, byte-level "
        f"stdlib corpus, batch {args.batch}, {args.steps} steps of `umup_fx.AdamW` at "
        f"eta {args.lr} (warmup + cosine), seed {args.seed}; training length {args.seq} "
        f"(variable: uniform in [{args.seq // 4}, {args.seq}] per step). Train loss: the "
        "mean of the last 10 steps. \"fixed\": `s` at the reference key length (the example "
        "inputs'), as umup_fx rewrites; \"length-dependent\": `s` from the run-time `S`, "
        "as the reference library (rules §3, Decisions).",
        "",
        *table,
        "",
        f"Machine: {machine()}. Command: `{command()}`.",
    ])
    print(body)
    if not args.no_write:
        write_section("attention_scale", body)


if __name__ == "__main__":
    main()
