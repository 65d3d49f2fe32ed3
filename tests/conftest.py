"""Suite-wide settings; the README runs the suite as ``python -m pytest -n auto --dist loadfile``.

``-n auto`` (pytest-xdist) runs one worker per core. ``--dist loadfile`` keeps each file on
one worker, so its module-scoped fixtures are built once and its tests run in file order
(tests/test_training.py's last test wraps the shared model's blocks).

Each worker takes its share of the cores for torch's intra-op threads: two workers with two
threads each on a 2-core machine would oversubscribe it. Subprocesses the tests start (the
gloo ranks, the plain export process) inherit the share through ``OMP_NUM_THREADS``. A
serial run keeps torch's default.

Each worker memoises the capture's ``torch.export`` call (``tests/export_cache.py``: a
fresh instance of a model exported before, with the same attributes and inputs, replays
that program; ``UMUP_FX_TEST_EXPORT_CACHE=0`` exports every time).

Tests over ~8 s alone on a 2-core CPU carry ``@pytest.mark.slow`` (declared in
pyproject.toml): ``-m "not slow"`` is the quick loop; the README's command runs them all.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch


def pytest_configure(config) -> None:
    from tests import export_cache

    export_cache.install()
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        threads = max(1, (cores or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="module")
def _fresh_dynamo_per_file():
    """Each file starts with Dynamo's caches empty: compiles of the same forward in earlier
    files neither count towards its recompile limit (past it, Dynamo runs the frame
    eagerly, silently) nor keep their graphs alive for the garbage collector to walk."""
    yield
    torch._dynamo.reset()
    gc.collect()
