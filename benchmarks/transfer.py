"""u-μP, μP, SP and SP + embedding LR side by side: η sweeps across width, into docs/.

    python benchmarks/transfer.py                       # the run in docs/transfer.md
    python benchmarks/transfer.py --widths 64 128 256 512 --steps 600 --seeds 0 1 2
    python benchmarks/transfer.py --no-write            # print only

Runs ``umup_fx.sweep`` on the example Llama (4 layers, d_head 32, the stdlib byte
corpus) for each parametrization over its own η grid (u-μP's η lives near 2^0, the
others' near 2^-9, so one grid cannot serve both), all into one resumable JSON file.
Writes the best η per width, the drift of log2 η*, the loss lost at the widest width
with the smallest width's η*, and the seeds' spread into the ``transfer_sweep`` section
of ``docs/transfer.md``, and the loss-vs-η figure to ``docs/transfer_sweep.png``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent))  # examples/; umup_fx as installed

import umup_fx  # noqa: E402
from benchmarks._doc import command, machine, write_section  # noqa: E402
from examples.llama import Llama, LlamaConfig  # noqa: E402
from umup_fx.transfer.sweep import plot_sweep  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs"
GRIDS = {
    "umup": [2.0**k for k in range(-2, 3)],
    "mup": [2.0**k for k in range(-11, -6)],
    "sp": [2.0**k for k in range(-11, -6)],
    "sp_emb_lr": [2.0**k for k in range(-11, -6)],
}


def factory(width: int, layers: int, seq: int) -> Llama:
    return Llama(LlamaConfig(d_model=width, n_layers=layers, n_heads=width // 32, max_seq_len=seq))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--parametrization", nargs="+", default=list(GRIDS))
    parser.add_argument("--json", default="transfer_sweep.json")
    parser.add_argument("--depths", type=int, nargs="+",
                        help="instead: u-muP's depth transfer over these layer counts")
    parser.add_argument("--depth-width", type=int, default=64)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.depths:
        return depth_transfer(args)
    start = time.perf_counter()
    result: dict = {}
    for par in args.parametrization:
        result = umup_fx.sweep(
            lambda width: factory(width, args.layers, args.seq), width_arg="width",
            widths=args.widths, lrs=GRIDS[par], steps=args.steps, parametrizations=[par],
            seeds=args.seeds, json_path=args.json, batch=args.batch, seq=args.seq,
        )
    minutes = (time.perf_counter() - start) / 60
    rows = ["| parametrization | η* by width (val loss, seed spread) | log2 η* drift | "
            "loss lost at widest with smallest's η* |", "|---|---|---|---|"]
    for par in args.parametrization:
        best = result["best"].get(par, {})
        cells = ", ".join(f"{w}: 2^{_log2(e['lr'])} ({e['val_loss']:.3f} ± {e['seed_spread'] / 2:.3f})"
                          for w, e in sorted(best.items(), key=lambda kv: int(kv[0])))
        rows.append(f"| {par} | {cells} | {result['log2_lr_drift'].get(par, float('nan')):.1f} | "
                    f"{result['transfer_loss'].get(par, float('nan')):.3f} |")
    body = "\n".join([
        f"Machine: {machine()}. Command: `{command()}` ({_timing(args.json, result, minutes)}).",
        "",
        f"Example Llama, {args.layers} layers, d_head 32, {args.steps} steps of batch "
        f"{args.batch} × {args.seq} bytes, seeds {args.seeds}; μP and SP + embedding LR "
        f"relative to width {min(args.widths)}. η grids: u-μP 2^-2 … 2^2, the others "
        "2^-11 … 2^-7. ± is half the spread between seeds.",
        "",
        *rows,
        "",
        *_verdicts(result, args.parametrization),
        "",
        "![validation loss against η](transfer_sweep.png)",
    ])
    print(body)
    if not args.no_write:
        plot_sweep(result, DOCS / "transfer_sweep.png")
        write_section("transfer_sweep", body, DOCS / "transfer.md")


def depth_transfer(args: argparse.Namespace) -> None:
    """u-muP's eta sweep over depth at one width: section ``transfer_depth``."""
    start = time.perf_counter()
    result = umup_fx.sweep(
        lambda layers: factory(args.depth_width, layers, args.seq), width_arg="layers",
        widths=args.depths, lrs=GRIDS["umup"], steps=args.steps, parametrizations=["umup"],
        seeds=args.seeds, json_path=args.json, batch=args.batch, seq=args.seq,
    )
    minutes = (time.perf_counter() - start) / 60
    best = result["best"]["umup"]
    rows = ["| layers | η* | val loss at η* (± half the seeds' spread) |", "|---|---|---|"]
    rows += [f"| {d} | 2^{_log2(e['lr'])} | {e['val_loss']:.3f} ± {e['seed_spread'] / 2:.3f} |"
             for d, e in sorted(best.items(), key=lambda kv: int(kv[0]))]
    body = "\n".join([
        f"Machine: {machine()}. Command: `{command()}` ({_timing(args.json, result, minutes)}).",
        "",
        f"u-μP, example Llama at width {args.depth_width}, {args.steps} steps of batch "
        f"{args.batch} × {args.seq}, seeds {args.seeds}. log2 η* drift over depth: "
        f"{result['log2_lr_drift']['umup']:.1f}; loss lost at the deepest with the "
        f"shallowest's η*: {result['transfer_loss']['umup']:.3f}.",
        "",
        *rows,
    ])
    print(body)
    if not args.no_write:
        write_section("transfer_depth", body, DOCS / "transfer.md")


def _verdicts(result: dict, parametrizations: list[str]) -> list[str]:
    """One computed line per parametrization: does its eta* transfer, beyond seed noise?"""
    lines = []
    for par in parametrizations:
        best = result["best"].get(par)
        if not best:
            continue
        widths = sorted(best, key=int)
        lost, drift = result["transfer_loss"][par], result["log2_lr_drift"][par]
        noise = best[widths[-1]]["seed_spread"] / 2
        verdict = ("above" if lost > noise else "within")
        lines.append(
            f"- {par}: η* moves {drift:.1f} log2 over {widths[0]} → {widths[-1]} "
            f"({int(widths[-1]) // int(widths[0])}× width); width {widths[-1]} trained at width "
            f"{widths[0]}'s η* loses {lost:.3f} nats, {verdict} the seeds' half-spread there "
            f"({noise:.3f}); best loss {best[widths[0]]['val_loss']:.3f} → "
            f"{best[widths[-1]]['val_loss']:.3f}.")
    return lines


def _timing(path: str, result: dict, minutes: float) -> str:
    """Runs and time; a resumed JSON's earlier runs were taken by the same command."""
    runs = result["runs"]
    timed = [r["seconds"] for r in runs if "seconds" in r]
    text = f"{len(runs)} runs in `{Path(path).name}`"
    if minutes >= 0.5:  # a rerun that resumed every run took none
        text += f"; this invocation {minutes:.0f} min"
    if len(timed) < len(runs):
        text += (f"; {len(runs) - len(timed)} runs resumed from the JSON, taken earlier by "
                 "this command before runs recorded their time")
    return text + (f"; {sum(timed) / 60:.0f} min of recorded training" if timed else "")


def _log2(lr: float) -> str:
    import math

    return f"{math.log2(lr):g}"


if __name__ == "__main__":
    main()
