"""Benchmarks write their figures into docs/ themselves: one marked section per script.

A section sits between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` in
``docs/benchmarks.md``; a rerun replaces it, so no figure is ever copied by hand.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def machine() -> str:
    """Where the figures were taken: CPU or GPU, cores, torch version, date."""
    if torch.cuda.is_available():
        where = torch.cuda.get_device_name()
    else:
        where = f"{platform.machine()} CPU, {os.cpu_count()} cores, no GPU"
    return f"{where}, torch {torch.__version__}, {datetime.date.today().isoformat()}"


def command() -> str:
    """The command line that ran this script, as the docs quote it (a file given by an
    absolute path shows its name only: no path of the machine that ran it)."""
    script = Path(sys.argv[0]).name
    args = [Path(a).name if Path(a).is_absolute() else a for a in sys.argv[1:]]
    return " ".join([f"python benchmarks/{script}", *map(shlex.quote, args)])


def write_section(name: str, body: str, doc: Path = DOC) -> None:
    """Replace (or append) the section ``name`` of ``doc`` with ``body``."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = doc.read_text() if doc.exists() else ""
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)
    print(f"wrote section {name!r} of {doc}")
