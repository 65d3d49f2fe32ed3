"""Scale tracking for FP8 layers (paper Figure 6's view): RMS over training steps.

    python benchmarks/fp8_scales.py               # 200 steps, every 10; docs/fp8_scales.png + docs/
    python benchmarks/fp8_scales.py --no-write    # print and plot only

Trains the example Llama with u-muP and simulated FP8 on the demo corpus and, every
``--every`` steps, records for each FP8 linear the RMS of its input activation, its
weight and the gradient arriving at its output (``umup_fx.diagnose.tracking.op_scales``). Plots
them on a log axis against the E4M3 (inputs, weights) and E5M2 (gradients) ranges,
and prints a table. The plot needs matplotlib (``pip install -e ".[plot]"``). Unless
``--no-write``, a summary (ranges per tensor kind at the first and last step, headroom to
the formats' limits, the machine and the command) goes into the ``fp8_scales`` section of
``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parent.parent))  # examples/; umup_fx as installed

import umup_fx  # noqa: E402
from benchmarks._doc import command as run_command  # noqa: E402
from benchmarks._doc import machine, write_section  # noqa: E402
from examples.data import get_batch, load_corpus, train_val_split  # noqa: E402
from examples.llama import Llama, LlamaConfig  # noqa: E402
from umup_fx.diagnose.tracking import op_scales  # noqa: E402
from umup_fx.runtime import fp8  # noqa: E402

# Smallest normal and largest finite values of the formats.
RANGES = {
    "E4M3": (2.0**-6, float(fp8.E4M3_MAX)),
    "E5M2": (2.0**-14, float(fp8.E5M2_MAX)),
}


def track(args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    torch.manual_seed(args.seed)
    data, _ = train_val_split(load_corpus(2_000_000))
    gen = torch.Generator().manual_seed(args.seed)
    model = Llama(LlamaConfig(d_model=args.d_model, n_layers=args.layers, n_heads=args.d_model // 32,
                              max_seq_len=args.seq))
    x, y = get_batch(data, args.batch, args.seq, gen)
    model = umup_fx.transform(model, (x, y), fp8="simulate")
    opt = umup_fx.AdamW(model, lr=args.lr)
    series: dict[str, dict[str, list[float]]] = {}
    steps: list[int] = []
    for step in range(args.steps + 1):
        x, y = get_batch(data, args.batch, args.seq, gen)
        if step % args.every == 0:
            steps.append(step)
            for r in op_scales(model, x, y):
                if r.op != "linear" or r.weight is None or not model.umup_plan.params[r.weight].fp8:
                    continue
                s = series.setdefault(r.weight, {"input": [], "weight": [], "grad": []})
                s["input"].append(r.in_rms or float("nan"))
                s["weight"].append(r.weight_rms or float("nan"))
                s["grad"].append(r.grad_rms or float("nan"))
        opt.zero_grad()
        loss = model(x, y)
        loss.backward()
        opt.step()
    series["_steps"] = {"steps": [float(s) for s in steps], "final_loss": [loss.item()]}
    print(f"final loss {loss.item():.3f}")
    return series


def report(series: dict[str, dict[str, list[float]]]) -> None:
    print("\n| FP8 layer | input RMS (first -> last) | weight RMS | grad RMS |")
    print("|---|---|---|---|")
    for name, s in series.items():
        if name.startswith("_"):
            continue
        cells = [f"{s[k][0]:.3g} -> {s[k][-1]:.3g}" for k in ("input", "weight", "grad")]
        print(f"| {name} | " + " | ".join(cells) + " |")


def summary(series: dict[str, dict[str, list[float]]], args: argparse.Namespace) -> str:
    """Markdown: per tensor kind, its RMS range at the first and last step and the headroom."""
    layers = {n: s for n, s in series.items() if not n.startswith("_")}
    steps = series["_steps"]["steps"]

    def span(values: list[float]) -> str:
        return f"{min(values):.3g} - {max(values):.3g}"

    lines = [
        "| tensor | format (normal range) | RMS at step 0 | RMS at step "
        f"{steps[-1]:.0f} | lowest / highest, all steps | headroom below / above (decades) |",
        "|---|---|---|---|---|---|",
    ]
    for kind, fmt in (("input", "E4M3"), ("weight", "E4M3"), ("grad", "E5M2")):
        lo, hi = RANGES[fmt]
        first = [s[kind][0] for s in layers.values() if math.isfinite(s[kind][0])]
        last = [s[kind][-1] for s in layers.values() if math.isfinite(s[kind][-1])]
        every = [v for s in layers.values() for v in s[kind] if math.isfinite(v)]
        below, above = math.log10(min(every) / lo), math.log10(hi / max(every))
        lines.append(
            f"| {kind} | {fmt} ({lo:.3g} - {hi:.6g}) | {span(first)} | {span(last)} "
            f"| {min(every):.3g} / {max(every):.3g} | {below:.1f} / {above:.1f} |"
        )
    missing = sum(not math.isfinite(v) for s in layers.values() for k in s for v in s[k])
    lines += [
        "",
        f"{len(layers)} FP8 layers ({', '.join(sorted({n.rsplit('.', 2)[-2] for n in layers}))}), "
        f"sampled every {args.every} steps of {args.steps}; final training loss "
        f"{series['_steps']['final_loss'][0]:.3f}; missing or non-finite RMS values: {missing}.",
    ]
    return "\n".join(lines)


def plot(series: dict[str, dict[str, list[float]]], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print('matplotlib is not installed (pip install -e ".[plot]"): no plot written.')
        return
    steps = series["_steps"]["steps"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharey=True)
    for ax, kind, fmt in zip(axes, ("input", "weight", "grad"), ("E4M3", "E4M3", "E5M2"), strict=True):
        lo, hi = RANGES[fmt]
        ax.axhspan(lo, hi, color="tab:green", alpha=0.08, label=f"{fmt} normal range")
        for name, s in series.items():
            if not name.startswith("_"):
                ax.plot(steps, s[kind], lw=1, alpha=0.8)
        ax.set_yscale("log")
        ax.set_title(f"{kind} RMS ({fmt})")
        ax.set_xlabel("step")
        ax.legend(loc="upper right")
    axes[0].set_ylabel("RMS")
    fig.suptitle("u-muP FP8 layers (q/k/v, gate/up): RMS over training, static scale 1")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--lr", type=float, default=1.0)  # the demo's eta (docs/transfer.md)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("docs/fp8_scales.png"))
    p.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    args = p.parse_args()
    series = track(args)
    report(series)
    plot(series, args.out)
    text = summary(series, args)
    print(f"\n{text}")
    if not args.no_write:
        command = run_command()
        settings = (
            f"example Llama d_model {args.d_model}, {args.layers} layers, batch {args.batch} x "
            f"{args.seq} bytes, eta {args.lr:g}, simulated FP8, seed {args.seed}; plot: `{args.out}`"
        )
        write_section("fp8_scales", f"{machine()}; `{command}`; {settings}\n\n{text}")


if __name__ == "__main__":
    main()
