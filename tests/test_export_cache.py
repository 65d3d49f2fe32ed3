"""The suite's export memo (tests/export_cache.py) replays what a fresh export gives,
and misses where the model differs in anything its forward may read."""

from __future__ import annotations

import pytest
import torch

import umup_fx
from tests import export_cache
from tests.test_patterns import FeaturesPlusPositions
from tests.tiny_models import graph_nodes


def _graphs(model: torch.nn.Module) -> list[str]:
    return [gm.code for gm in model.region_graphs().values()]


def _fresh_class() -> type:
    """A class no earlier test in this worker exported (the memo lives per process)."""
    return type("Fresh", (FeaturesPlusPositions,), {})


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(4, 8, 16, generator=gen), torch.randint(0, 64, (4, 16), generator=gen)


@pytest.fixture(autouse=True)
def _memo_on():
    with export_cache.installed():  # even under UMUP_FX_TEST_EXPORT_CACHE=0
        yield


def test_a_replayed_export_is_a_fresh_one() -> None:
    feats, labels = _inputs()
    cls = _fresh_class()
    with export_cache.uninstalled():
        fresh = umup_fx.transform(cls(), (feats, labels))
    hits = export_cache.stats["hits"]
    umup_fx.transform(cls(), (feats, labels))  # exported, stored
    assert export_cache.stats["hits"] == hits
    torch.manual_seed(1)
    replayed = umup_fx.transform(cls(), (feats, labels))
    assert export_cache.stats["hits"] == hits + 1
    assert _graphs(replayed) == _graphs(fresh)
    assert str(replayed.umup_plan) == str(fresh.umup_plan)
    replayed.load_state_dict(fresh.state_dict())
    torch.testing.assert_close(replayed(feats, labels), fresh(feats, labels), rtol=0, atol=0)


def test_an_attribute_the_forward_reads_misses() -> None:
    # shared=True changes only a Python attribute (no weight, no input): another graph.
    feats, labels = _inputs()
    cls = _fresh_class()
    umup_fx.transform(cls(), (feats, labels))
    hits = export_cache.stats["hits"]
    shared = umup_fx.transform(cls(shared=True), (feats, labels))
    assert export_cache.stats["hits"] == hits  # exported anew, nothing replayed
    assert any(n.target is torch.ops.aten.select.int or "slice" in str(n.target)
               for n in graph_nodes(shared))
    umup_fx.transform(cls(), (feats[:2], labels[:2]))  # other inputs
    assert export_cache.stats["hits"] == hits


def test_a_checkpointed_capture_is_never_replayed() -> None:
    # The capture's record of activation checkpoints points at the model's own modules:
    # such a capture is exported every time (and the capture keeps its checkpoints).
    from tests.test_calls import VOCAB, _CheckpointingLM

    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    hits = export_cache.stats["hits"]
    for _ in range(2):
        umup_fx.transform(_CheckpointingLM("whole"), (ids, ids), check=False)
    assert export_cache.stats["hits"] == hits
