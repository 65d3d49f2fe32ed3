"""μP's coordinate check (rules §8) for u-μP, μP, SP and SP + embedding LR; into docs/.

    python benchmarks/coord_check.py              # widths 64 128 256 512, 5 steps; updates docs/
    python benchmarks/coord_check.py --no-write   # print only

Runs ``umup_fx.transfer.coord_check.coord_check`` (what ``python -m umup_fx coord-check`` runs) on
the example Llama: a few AdamW steps per width and parametrization, each at its own η
(``coord_check.DEFAULT_LR``: u-μP 2^0, the others 2^-9, their best in docs/transfer.md's
sweep), then the RMS of every weight op's output on a held-out batch. Under a
parametrization that transfers the RMS does not trend with width (log-log slope near
0); under SP it grows. Writes the mean RMS per layer kind and width, the slopes, and
the figure ``docs/coord_check.png`` into the ``coord_check`` section of
``docs/transfer.md``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent))  # examples/; umup_fx as installed

from benchmarks._doc import command, machine, write_section  # noqa: E402
from examples.llama import Llama, LlamaConfig  # noqa: E402
from umup_fx.transfer.coord_check import DEFAULT_LR, coord_check, plot_coord_check  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs"
KINDS = ("embed", "q_proj", "o_proj", "up_proj", "down_proj", "lm_head")
NAMES = {"umup": "u-μP", "mup": "μP", "sp": "SP", "sp_emb_lr": "SP + embedding LR"}


def table(result: dict, par: str, widths: list[int]) -> list[str]:
    last = max(r["step"] for r in result["records"])
    rms: dict[tuple[str, int], list[float]] = {}
    for r in result["records"]:
        kind = next((k for k in KINDS if k in r["layer"]), None)
        if r["parametrization"] == par and r["step"] == last and kind:
            rms.setdefault((kind, r["width"]), []).append(r["rms"])
    slopes = {next(k for k in KINDS if k in layer): s
              for layer, s in result["slopes"][par].items() if any(k in layer for k in KINDS)}
    eta = DEFAULT_LR[par]
    eta_text = f"2^{math.log2(eta):g}" if math.log2(eta).is_integer() else f"{eta:g}"
    rows = [f"{NAMES[par]} (η = {eta_text}): mean RMS of the layer kind's outputs", "",
            "| layer | " + " | ".join(f"d={w}" for w in widths) + " | slope |",
            "|---|" + "---:|" * (len(widths) + 1)]
    for kind in KINDS:
        cells = " | ".join(f"{sum(v) / len(v):.3g}" for w in widths
                           if (v := rms.get((kind, w))))
        rows.append(f"| {kind} | {cells} | {slopes[kind]:+.2f} |")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--parametrization", nargs="+", default=list(NAMES))
    p.add_argument("--no-write", action="store_true", help="do not update docs/")
    args = p.parse_args()

    def factory(width: int) -> Llama:
        return Llama(LlamaConfig(d_model=width, n_layers=args.layers, n_heads=width // 32,
                                 max_seq_len=args.seq))

    result = coord_check(factory, width_arg="width", widths=args.widths, steps=args.steps,
                         parametrizations=args.parametrization, batch=args.batch, seq=args.seq)
    lines = [f"{machine()}; `{command()}`; {args.steps} AdamW steps, {args.layers} layers, "
             f"d_head 32, batch {args.batch} × {args.seq} bytes, seed 0; μP and SP + "
             f"embedding LR relative to width {min(args.widths)}. Slope: least-squares slope "
             "of log RMS against log width at the last step.", ""]
    for par in args.parametrization:
        lines += table(result, par, args.widths) + [""]
    lines.append("- largest |slope|: " + ", ".join(
        f"{NAMES[par]} {max(abs(s) for s in result['slopes'][par].values()):.2f}"
        for par in args.parametrization))
    lines += ["", "![output RMS against width](coord_check.png)"]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        plot_coord_check(result, DOCS / "coord_check.png")
        write_section("coord_check", text, DOCS / "transfer.md")


if __name__ == "__main__":
    main()
