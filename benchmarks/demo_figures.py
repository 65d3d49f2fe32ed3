"""The demo's final losses, float32 vs simulated FP8, written into docs/.

    python benchmarks/demo_figures.py              # run both demos, print, update docs/
    python benchmarks/demo_figures.py --no-write   # print only
    python benchmarks/demo_figures.py -- --steps 50   # pass arguments on to examples/demo.py

Runs ``python examples/demo.py`` and ``python examples/demo.py --fp8`` (the commands the
docs quote, in a subprocess each, so the figures are exactly the demo's), reads their last
lines (steps trained, time, final train and validation loss) and writes:

- the ``demo_fp8`` section of ``docs/benchmarks.md``: both runs and the FP8 run's
  relative distance to the float32 one;
- the ``demo_default`` section of ``docs/transfer.md``: the float32 run (the demo's
  default eta).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # examples/; umup_fx as installed

from benchmarks._doc import command as run_command  # noqa: E402
from benchmarks._doc import machine, write_section  # noqa: E402

_PATTERNS = {
    "steps": r"^trained (\d+) steps in ([0-9.]+)s",
    "train": r"^final train loss \(mean of last \d+ steps\): (\S+)",
    "val": r"^final val loss: (\S+)",
}


def run_demo(extra: list[str]) -> dict:
    """Run examples/demo.py with ``extra`` arguments; return its final figures."""
    cmd = [sys.executable, "examples/demo.py", *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    out: dict = {"command": " ".join(["python examples/demo.py", *map(shlex.quote, extra)]),
                 "wall": wall}
    for key, pattern in _PATTERNS.items():
        m = re.search(pattern, proc.stdout, re.MULTILINE)
        if m is None:
            raise RuntimeError(f"no {key!r} line in the demo's output:\n{proc.stdout[-2000:]}")
        if key == "steps":
            out["steps"], out["train_seconds"] = int(m.group(1)), float(m.group(2))
        else:
            out[key] = float(m.group(1))
    return out


def _row(name: str, r: dict) -> str:
    return (f"| {name} | `{r['command']}` | {r['steps']} | {r['train']:.4f} | {r['val']:.4f} "
            f"| {r['train_seconds']:.1f} s |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--no-write", action="store_true", help="do not update docs/")
    parser.add_argument("demo_args", nargs="*", help="passed on to examples/demo.py (after --)")
    args = parser.parse_args()
    load = os.getloadavg()[0]  # other work on the machine slows the runs down
    high = run_demo(list(args.demo_args))
    fp8 = run_demo([*args.demo_args, "--fp8"])
    head = ["| run | command | steps trained | final train loss | final val loss | training time |",
            "|---|---|---:|---:|---:|---:|"]
    finite = all(math.isfinite(r[k]) for r in (high, fp8) for k in ("train", "val"))
    gap = (fp8["val"] - high["val"]) / high["val"]
    gap_train = (fp8["train"] - high["train"]) / high["train"]
    load_note = (f"Training times depend on the machine's load (1-minute load average "
                 f"{load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end).")
    both = "\n".join([
        *head,
        _row("u-muP, float32", high),
        _row("u-muP, FP8 (simulated)", fp8),
        "",
        f"FP8 vs float32, relative: train {gap_train:+.2%}, val {gap:+.2%}; "
        f"all losses finite: {'yes' if finite else 'no'}. {load_note}",
    ])
    default = "\n".join([*head, _row("u-muP, float32 (demo defaults)", high), "", load_note])
    print(both)
    if not args.no_write:
        command = run_command()
        write_section("demo_fp8", f"{machine()}; `{command}`\n\n{both}")
        write_section("demo_default", f"{machine()}; `{command}`\n\n{default}",
                      doc=ROOT / "docs" / "transfer.md")


if __name__ == "__main__":
    main()
