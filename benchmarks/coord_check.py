"""μP's coordinate check (rules §8): activation scale after a few Adam steps vs width.

    python benchmarks/coord_check.py              # widths 64 128 256 512, 5 steps; updates docs/
    python benchmarks/coord_check.py --no-write   # print only

Trains the example Llama for a few AdamW steps at several widths, in standard
parametrization (the model as written, PyTorch's AdamW, one LR for all) and with
u-muP (``umup_fx.transform`` + ``umup_fx.AdamW``), both at the same eta, and measures
the RMS of every linear's output on a held-out batch. Under u-muP the RMS should not
trend with width (log-log slope near 0); under SP it grows. Prints the mean RMS per
width and the slope of log RMS against log width, per layer kind, and writes the tables
(with the machine and the command) into the ``coord_check`` section of ``docs/transfer.md``.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import umup_fx  # noqa: E402
from benchmarks._doc import command as run_command  # noqa: E402
from benchmarks._doc import machine, write_section  # noqa: E402
from examples.data import get_batch, load_corpus  # noqa: E402
from examples.llama import Llama, LlamaConfig  # noqa: E402
from umup_fx.tracking import op_scales, rms  # noqa: E402

KINDS = ("q_proj", "o_proj", "up_proj", "down_proj", "lm_head")


def _kind(name: str) -> str | None:
    return next((k for k in KINDS if k in name), None)


def _train(model, opt, data, args, gen) -> None:
    for _ in range(args.steps):
        x, y = get_batch(data, args.batch, args.seq, gen)
        opt.zero_grad()
        model(x, y).backward()
        opt.step()


def measure(width: int, umup: bool, data: torch.Tensor, args: argparse.Namespace) -> dict[str, float]:
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    config = LlamaConfig(d_model=width, n_layers=args.layers, n_heads=width // 32, max_seq_len=args.seq)
    model = Llama(config)
    x, y = get_batch(data, args.batch, args.seq, gen)
    out: dict[str, list[float]] = defaultdict(list)
    if umup:
        model = umup_fx.transform(model, (x, y))
        _train(model, umup_fx.AdamW(model, lr=args.lr_umup), data, args, gen)
        for r in op_scales(model, x, y, backward=False):
            if r.weight and _kind(r.weight):
                out[_kind(r.weight)].append(r.out_rms)
    else:
        _train(model, torch.optim.AdamW(model.parameters(), lr=args.lr_sp), data, args, gen)
        hooks = []
        for name, module in model.named_modules():
            kind = _kind(name)
            if isinstance(module, torch.nn.Linear) and kind:
                hooks.append(module.register_forward_hook(
                    lambda mod, i, o, k=kind: out[k].append(rms(o))
                ))
        with torch.no_grad():
            model(x, y)
        for h in hooks:
            h.remove()
    return {k: sum(v) / len(v) for k, v in out.items()}


def slope(widths: list[int], values: list[float]) -> float:
    xs, ys = [math.log2(w) for w in widths], [math.log2(v) for v in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((a - mx) * (b - my) for a, b in zip(xs, ys, strict=True)) / sum((a - mx) ** 2 for a in xs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr-umup", type=float, default=1.0, help="u-muP eta (docs/transfer.md)")
    p.add_argument("--lr-sp", type=float, default=1e-2, help="SP learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-write", action="store_true", help="do not update docs/")
    args = p.parse_args()
    data = load_corpus(1_000_000)
    lines: list[str] = []
    slopes: dict[str, list[float]] = {}
    growth: dict[str, float] = {}
    for umup in (False, True):
        rows = {w: measure(w, umup, data, args) for w in args.widths}
        name = "u-muP" if umup else "standard parametrization"
        lines += [f"\n{name}: mean RMS of the layer kind's outputs\n",
                  "| layer | " + " | ".join(f"d={w}" for w in args.widths)
                  + " | slope (log2 RMS / log2 width) |",
                  "|---|" + "---:|" * (len(args.widths) + 1)]
        slopes[name] = []
        for kind in KINDS:
            values = [rows[w][kind] for w in args.widths]
            k = slope(args.widths, values)
            slopes[name].append(k)
            if not umup:
                growth[kind] = values[-1] / values[0]
            cells = " | ".join(f"{v:.3g}" for v in values)
            lines.append(f"| {kind} | {cells} | {k:+.2f} |")
    top = max(growth, key=growth.get)
    lines += [
        "",
        "- largest |slope|: " + ", ".join(
            f"{name} {max(abs(k) for k in ks):.2f}" for name, ks in slopes.items()),
        f"- largest growth under SP from d={args.widths[0]} to d={args.widths[-1]}: "
        f"{top}, {growth[top]:.0f}x",
    ]
    text = "\n".join(lines).strip()
    print(text)
    if not args.no_write:
        command = run_command()
        settings = (
            f"{args.steps} AdamW steps, {args.layers} layers, d_head 32, batch {args.batch} x "
            f"{args.seq} bytes; SP lr {args.lr_sp:g} (`torch.optim.AdamW`), u-muP eta "
            f"{args.lr_umup:g} (`umup_fx.AdamW`), seed {args.seed}"
        )
        write_section(
            "coord_check",
            f"{machine()}; `{command}`; {settings}\n\n{text}",
            doc=Path(__file__).resolve().parent.parent / "docs" / "transfer.md",
        )


if __name__ == "__main__":
    main()
