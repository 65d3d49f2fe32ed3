"""Does u-μP's η, tuned on a dense model, transfer to its MoE counterparts? Into docs/moe.md.

    python benchmarks/moe_transfer.py                 # the run in docs/moe.md
    python benchmarks/moe_transfer.py --steps 400 --seeds 0 1 2
    python benchmarks/moe_transfer.py --no-write      # print only

Complete-muE's practical recipe is "tune dense once, transfer to all MoE setups". This
runs ``umup_fx.sweep`` (u-μP, the stdlib byte corpus) over one η grid for a dense LM
and MoE LMs that differ from it only in their MLPs: the same expert (a GELU MLP of
the dense hidden width), E experts, top-k routing with renormalised gates
(``examples.moe``: dense dispatch through einsum, which trains on any device in fp32;
``torch._grouped_mm`` computes the same function in bf16 on a GPU). The "width" of
the sweep's JSON is the variant's index in ``VARIANTS``. Writes η* per variant, the
loss each MoE loses by taking the dense model's η* instead of its own, and the
seeds' spread into the ``moe_transfer`` section of ``docs/moe.md``, and the
loss-vs-η figure to ``docs/moe_transfer.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent))  # examples/; umup_fx as installed

import umup_fx  # noqa: E402
from benchmarks._doc import command, machine, write_section  # noqa: E402
from examples.moe import EinsumMoE, GeluMLP, MoELM  # noqa: E402
from umup_fx.transfer.plots import panels, save  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs"
# (name, experts, top-k); experts 0: the dense MLP itself.
VARIANTS = [("dense", 0, 0), ("MoE E=4 top-1", 4, 1), ("MoE E=4 top-2", 4, 2),
            ("MoE E=8 top-2", 8, 2)]
LRS = [2.0**k for k in range(-2, 4)]


def factory(variant: int, width: int, layers: int, hidden_mult: int) -> MoELM:
    _, experts, k = VARIANTS[variant]
    hidden = hidden_mult * width
    if experts == 0:
        return MoELM(width=width, layers=layers, moe=lambda d: GeluMLP(d, hidden))
    return MoELM(width=width, layers=layers,
                 moe=lambda d: EinsumMoE(d, hidden=hidden, experts=experts, k=k))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden-mult", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--json", default="moe_transfer.json")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    start = time.perf_counter()
    before = len(json.loads(Path(args.json).read_text())["runs"]) if Path(args.json).exists() else 0
    result = umup_fx.sweep(
        lambda variant: factory(variant, args.width, args.layers, args.hidden_mult),
        width_arg="variant", widths=list(range(len(VARIANTS))), lrs=LRS, steps=args.steps,
        seeds=args.seeds, json_path=args.json, batch=args.batch, seq=args.seq,
    )
    minutes = (time.perf_counter() - start) / 60
    mean = _mean_losses(result["runs"])
    best = result["best"]["umup"]
    dense_lr = best["0"]["lr"]
    lost = [mean[(i, dense_lr)] - best[str(i)]["val_loss"] for i in range(len(VARIANTS))]
    spread = max(e["seed_spread"] / 2 for e in best.values())
    rows = ["| model | η* | val loss at η* (± half the seeds' spread) | at the dense η* | "
            "lost by taking the dense η* |", "|---|---|---|---|---|"]
    for i, (name, _, _) in enumerate(VARIANTS):
        e = best[str(i)]
        at_dense = mean[(i, dense_lr)]
        rows.append(f"| {name} | 2^{math.log2(e['lr']):g} | {e['val_loss']:.3f} ± "
                    f"{e['seed_spread'] / 2:.3f} | {at_dense:.3f} | {at_dense - e['val_loss']:.3f} |")
    timed = sum(r.get("seconds", 0.0) for r in result["runs"]) / 60
    body = "\n".join([
        f"Machine: {machine()}. Command: `{command()}` ({len(result['runs'])} runs in "
        f"`{Path(args.json).name}`, "
        + (f"{len(result['runs']) - before} of them by this invocation in {minutes:.0f} min"
           if len(result["runs"]) > before else "all resumed from it")
        + f"; {timed:.0f} min of recorded training).",
        "",
        f"u-μP LMs of width {args.width}, {args.layers} layers, MLP hidden "
        f"{args.hidden_mult}×width (each expert the dense MLP's size), {args.steps} steps of "
        f"batch {args.batch} × {args.seq} bytes, seeds {args.seeds}, η grid 2^-2 … 2^3. "
        f"log2 η* drift across the four: {result['log2_lr_drift']['umup']:.1f}. The most any "
        f"MoE loses by taking the dense model's η*: {max(lost):.3f} nats, against seeds' "
        f"half-spreads up to {spread:.3f}.",
        "",
        *rows,
        "",
        "![validation loss against η, dense and MoE](moe_transfer.png)",
    ])
    print(body)
    if not args.no_write:
        _plot(mean, DOCS / "moe_transfer.png")
        write_section("moe_transfer", body, DOCS / "moe.md")


def _mean_losses(runs: list[dict]) -> dict[tuple[int, float], float]:
    table: dict[tuple[int, float], list[float]] = {}
    for r in runs:
        table.setdefault((r["width"], r["lr"]), []).append(r["val_loss"])
    return {k: sum(v) / len(v) for k, v in table.items()}


def _plot(mean: dict[tuple[int, float], float], path: Path) -> None:
    fig, (ax,) = panels(1)
    for i, (name, _, _) in enumerate(VARIANTS):
        lrs = sorted(lr for v, lr in mean if v == i)
        ax.plot(lrs, [mean[(i, lr)] for lr in lrs], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("learning rate η")
    ax.set_title("u-μP: dense vs MoE")
    save(fig, path, "validation loss", 8)


if __name__ == "__main__":
    main()
