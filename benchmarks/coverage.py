"""Coverage of common architectures: transform, one step, unit scale at init; into docs/.

    python benchmarks/coverage.py             # check every family, write docs/coverage.md
    python benchmarks/coverage.py --no-write  # print only
    python benchmarks/coverage.py Llama T5    # some families (printed, not written)
    python benchmarks/coverage.py --update Llama T5  # rerun those rows of docs/coverage.md

Each family is a tiny random-init model (``tests/families.py``: width 64, 2 layers,
vocab 128, seeded). For each: ``umup_fx.transform``; one forward + backward (the model's
own loss, or for a backbone a unit-Gaussian gradient at its output); the RMS of every
trainable weight's gradient; the logits' RMS against the readout's fan_in^-1/2; one
``umup_fx.AdamW`` step, checked finite; one call at another batch (+1) and sequence
length (half). The verdict: right (all of these in their bands), warned (transform named
what is off: ScaleWarning, UncoveredOpWarning, PostNormWarning), refused (a UmupError
saying what to do), or silently wrong. A family whose library is not importable here
is listed as such.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import warnings
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent))  # examples/; umup_fx as installed

from benchmarks._doc import command, machine, write_section  # noqa: E402
from tests.families import FAMILIES, Result, check, is_qk  # noqa: E402

DOC = Path(__file__).resolve().parent.parent / "docs" / "coverage.md"


def _cell(ok: bool | None) -> str:
    return "-" if ok is None else ("yes" if ok else "**no**")


def _one_line(message: str, limit: int = 200) -> str:
    """A table cell: one line, no pipes, files named by their last two path parts (no
    path of the machine that ran it)."""
    text = re.sub(r'/[^\s"]*/([^/\s"]+/[^/\s"]+\.py)', r"\1", " ".join(message.split()))
    return text.replace("|", "/")[:limit]


def _row(r: Result, seconds: float) -> str:
    if r.status in ("refused", "crashed", "unavailable"):
        what = {"refused": "refused (UmupError)", "crashed": "**crashed**",
                "unavailable": "not run"}[r.status]
        return f"| {r.family} | {r.verdict} | {what} | - | - | - | - | - | {_one_line(r.message)} |"
    qk = {n for n in r.grad_rms if is_qk(n)}
    grads = [v for n, v in r.grad_rms.items() if n not in qk]
    span = f"{min(grads):.2f} .. {max(grads):.2f}" if grads else "-"
    if qk:
        span += f" (q/k from {min(r.grad_rms[n] for n in qk):.2f})"
    logits = "-"
    if r.logits_rms is not None and r.readout_fan_in:
        logits = f"{r.logits_rms:.3f} (fan_in^-1/2 = {r.readout_fan_in ** -0.5:.3f})"
    outside = ", ".join(n.split(".")[-2] + "." + n.split(".")[-1] for n in r.low_grads()[:3])
    unit = _cell(r.unit_scale) + (f" (outside: {outside})" if outside else "")
    notes = "; ".join(filter(None, [
        "uncovered: " + ", ".join(sorted(set(r.uncovered))) if r.uncovered else "",
        ", ".join(w for w in r.warned if w != "UncoveredOpWarning"),
    ]))
    return (f"| {r.family} | {r.verdict} | yes ({seconds:.1f} s) | {_cell(r.step_finite)} "
            f"| {_cell(r.other_sizes)} | {span} | {unit} | {logits} | {notes or '-'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="*", help="families to check (default: all)")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--update", action="store_true",
                        help="replace only these families' rows of docs/coverage.md")
    args = parser.parse_args()
    names = args.families or list(FAMILIES)
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        parser.error(f"unknown families {unknown}; known: {', '.join(FAMILIES)}")
    warnings.filterwarnings("ignore")
    rows = []
    for name in names:
        start = time.perf_counter()
        result = check(name)
        rows.append(_row(result, time.perf_counter() - start))
        print(rows[-1], flush=True)
    header = [f"Machine: {machine()}. Command: `{command()}`."]
    if args.update and args.families:
        rows, header = _merged(rows, header)
    covered = sum("| yes (" in r for r in rows)
    verdicts = [r.split("|")[2].strip() for r in rows]
    count = {k: sum(v.startswith(k) for v in verdicts)
             for k in ("right", "warned", "refused", "**silently wrong**", "**crashed**", "not run")}
    body = "\n".join([
        *header,
        "",
        f"{len(rows)} families: {covered} transform. Verdicts: {count['right']} right, "
        f"{count['warned']} warned, {count['refused']} refused, {count['**crashed**']} crashed, "
        f"{count['**silently wrong**']} silently wrong, {count['not run']} not run.",
        "",
        "| family | verdict | transform | AdamW step finite | other sizes | weight grad RMS at "
        "init (q/k) | unit scale | logits RMS | notes |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
    ])
    if args.no_write or args.families and not args.update:
        return
    write_section("coverage", body, DOC)


def _merged(new_rows: list[str], header: list[str]) -> tuple[list[str], list[str]]:
    """The table of docs/coverage.md with ``new_rows`` in place of those families' rows
    (appended if new), and its header lines plus one saying which rows this run wrote."""
    text = DOC.read_text().split("<!-- coverage:begin -->", 1)[1].split("<!-- coverage:end -->")[0]
    lines = text.strip().splitlines()
    old_header = [ln for ln in lines if ln.startswith(("Machine:", "Rows "))]
    rows = [ln for ln in lines if ln.startswith("| ") and not ln.startswith("| family")]
    fresh = {r.split("|")[1].strip(): r for r in new_rows}
    merged = [fresh.pop(r.split("|")[1].strip(), r) for r in rows] + list(fresh.values())
    names = ", ".join(r.split("|")[1].strip() for r in new_rows)
    # an earlier rerun of exactly these rows is superseded by this one
    old_header = [ln for ln in old_header if not ln.startswith(f"Rows {names} rerun on ")]
    return merged, [*old_header, f"Rows {names} rerun on {machine()}: `{command()}`."]


if __name__ == "__main__":
    main()
