"""A byte-level text corpus that needs no download: the Python standard library's source.

Every Python installation ships its standard library as ``.py`` files, so this corpus is
available offline, on any machine that can run these examples, with no extra packages. The
text is real, varied English-and-code (docstrings, comments, identifiers), enough for
small language-model experiments at the byte level (vocabulary 256). It is distributed under
the Python Software Foundation License, which permits this use.

We take the ``*.py`` files directly in ``sysconfig.get_paths()["stdlib"]`` (not its
subdirectories), sorted by name, and concatenate their bytes until ``max_bytes``. The
contents vary slightly between Python versions (files are added, removed and edited), so
the exact corpus, and losses measured on it, are only comparable within one Python version.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch
from torch import Tensor


def corpus_files() -> list[Path]:
    """The standard library's top-level ``*.py`` files, sorted by name."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in stdlib.glob("*.py") if p.is_file())


def load_file(path: str, max_bytes: int | None = None) -> Tensor:
    """A file's bytes (at most ``max_bytes``) as a 1-D long tensor in 0..255."""
    raw = Path(path).read_bytes()[:max_bytes]
    if len(raw) < 2:
        raise ValueError(f"{path}: too little data ({len(raw)} bytes)")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()


def load_corpus(max_bytes: int = 2_000_000) -> Tensor:
    """Concatenated stdlib source bytes (at most ``max_bytes``) as a 1-D long tensor in 0..255."""
    chunks: list[bytes] = []
    total = 0
    for path in corpus_files():
        if total >= max_bytes:
            break
        data = path.read_bytes()[: max_bytes - total]
        chunks.append(data)
        total += len(data)
    if total == 0:
        raise RuntimeError("no standard-library source files found")
    buf = bytearray(b"".join(chunks))
    return torch.frombuffer(buf, dtype=torch.uint8).long()


def train_val_split(data: Tensor, val_fraction: float = 0.1) -> tuple[Tensor, Tensor]:
    """Split a 1-D tensor into a leading train part and a trailing validation part."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError("val_fraction must be in [0, 1)")
    n_train = int(len(data) * (1.0 - val_fraction))
    return data[:n_train], data[n_train:]


def get_batch(
    data: Tensor, batch_size: int, seq_len: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Random windows ``x`` [batch_size, seq_len] and next-byte targets ``y`` (x shifted by one).

    Deterministic given the state of ``generator``.
    """
    if len(data) <= seq_len:
        raise ValueError("data must be longer than seq_len")
    ix = torch.randint(len(data) - seq_len, (batch_size,), generator=generator)
    offsets = torch.arange(seq_len + 1)
    windows = data[ix[:, None] + offsets].long()
    return windows[:, :-1], windows[:, 1:]
