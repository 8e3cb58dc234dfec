"""Reader leases against publishing: the cleanup after a publish keeps every version a live reader lease
holds (``omnisage_pipeline.storage.leases``), and the embedding step reads its inputs under leases."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from omnisage_pipeline.embedding import run as embedding_run
from omnisage_pipeline.embedding.day import DayEmbeddings, entity_table
from omnisage_pipeline.settings import Settings
from omnisage_pipeline.storage import leases
from omnisage_pipeline.storage.publish import publish_partition, published_path, require_published
from omnisage_pipeline.storage.shared_versions import publish_shared

KEY = "2026-01-01"


def _publish(dataset: Path, content: str, key: str = KEY) -> Path:
    with publish_partition(dataset, key) as staging:
        (staging / "sub").mkdir()
        (staging / "part-0.txt").write_text(content)
        (staging / "sub" / "part-1.txt").write_text(content)
    return published_path(dataset, key)


def _content(version: Path) -> set[str]:
    return {p.read_text() for p in version.rglob("*.txt")}


def _versions(dataset: Path) -> set[Path]:
    return {p.resolve() for p in (dataset / ".versions").iterdir()}


def test_republishing_keeps_the_exact_version_a_reader_leased_until_the_lease_ends(tmp_path):
    dataset = tmp_path / "ds"
    _publish(dataset, "v1")
    with leases.read_lease(dataset, KEY) as held:
        v2 = _publish(dataset, "v2")
        v3 = _publish(dataset, "v3")
        v4 = _publish(dataset, "v4")
        # The reader still reads what it resolved, whole, three publishes later.
        assert _content(held) == {"v1"}
        # The lease names that version: v2 (neither current, previous nor leased) went as usual.
        assert _versions(dataset) == {held, v3, v4} and not v2.exists()
    v5 = _publish(dataset, "v5")
    assert _versions(dataset) == {v4, v5}  # the lease is gone: the next cleanup removed it
    assert not list((dataset / ".leases").glob("dt=*"))


def test_a_lease_that_names_no_version_keeps_every_version_of_its_day(tmp_path):
    # Every new lease records the day only until it has resolved dt=D (and acquire_lease without a version).
    dataset = tmp_path / "ds"
    _publish(dataset, "v1")
    lease = leases.acquire_lease(dataset, KEY)
    held = require_published(dataset, KEY)
    later = [_publish(dataset, f"v{i}") for i in (2, 3, 4)]
    assert _content(held) == {"v1"}
    assert _versions(dataset) == {held, *later}
    leases.release_lease(lease)
    last = _publish(dataset, "v5")
    assert _versions(dataset) == {later[-1], last}


def test_a_lease_of_another_day_does_not_keep_this_days_versions(tmp_path):
    dataset = tmp_path / "ds"
    _publish(dataset, "other", key="2026-01-02")
    first = _publish(dataset, "v1")
    with leases.read_lease(dataset, "2026-01-02"):
        _publish(dataset, "v2")
        _publish(dataset, "v3")
    assert not first.exists()


def test_a_dead_readers_lease_keeps_nothing(tmp_path):
    dataset = tmp_path / "ds"
    first = _publish(dataset, "v1")
    lease = leases.acquire_lease(dataset, KEY, first)
    body = json.loads(lease.read_text())
    lease.write_text(json.dumps({**body, "pid": 2**22 + 1}))  # above pid_max: no such process
    _publish(dataset, "v2")
    _publish(dataset, "v3")
    assert not first.exists()


def _build(content: str):
    def build(staging: Path) -> None:
        (staging / "part-0.txt").write_text(content)

    return build


def test_shared_versions_keep_a_leased_version_and_collect_it_once_released(tmp_path):
    dataset = tmp_path / "meta"
    first = publish_shared(dataset, KEY, "a", _build("a")).version
    with leases.read_lease(dataset, KEY) as held:
        assert held == first
        publish_shared(dataset, KEY, "b", _build("b"))  # first is now the day's .previous record
        publish_shared(dataset, KEY, "c", _build("c"))  # ... and no longer: collected unless leased
        assert _content(held) == {"a"}
    # No link or record points to it and no lease holds it: the next publish of any day collects it.
    publish_shared(dataset, "2026-01-02", "c", _build("c"))
    assert not first.exists()


def test_embedding_step_reads_its_inputs_under_leases(tmp_path, monkeypatch):
    settings = Settings.from_env({"OMNISAGE_HOME": str(tmp_path / "home")})
    inputs = {
        "metadata_dir": settings.warehouse_dataset("entity_metadata"),
        "graph_dir": settings.graph_dir,
        "features_dir": settings.features_dir,
        "examples_dir": settings.warehouse_dataset("training_examples"),
    }
    for dataset in inputs.values():
        _publish(dataset, "original")
    seen = {}

    def embed_day(loaded, day_inputs, options, log=None):
        # Another writer re-publishes every input twice while the day is being embedded.
        for dataset in inputs.values():
            _publish(dataset, "republished")
            _publish(dataset, "republished again")
        for field, dataset in inputs.items():
            resolved = getattr(day_inputs, field)
            seen[field] = (resolved, _content(resolved))
            held = leases.lease_holds(dataset)
            assert held.protects(resolved) and resolved.name in held.versions, field
        ids = np.array([1, 2], np.int64)
        emb = np.eye(2, dtype=np.float32)
        return DayEmbeddings(entity_table("pin", ids, emb, "7"), None, {"entities_total_day": 2})

    monkeypatch.setattr(embedding_run, "embed_day", embed_day)
    loaded = SimpleNamespace(version="7", run_id="r", training_partition=None)
    figures = embedding_run.embed_and_publish(settings, loaded, KEY)
    assert figures["publish"] == "published"
    assert {field: content for field, (_path, content) in seen.items()} == {f: {"original"} for f in inputs}
    for dataset in inputs.values():  # released: nothing left behind
        assert not list((dataset / ".leases").glob("dt=*"))
    assert require_published(settings.embeddings_dir, KEY).is_dir()


@pytest.mark.parametrize("key", ["2026-01-05/../../etc", "../x", "", "a b", "a.b"])
def test_leases_refuse_a_key_that_is_not_a_plain_name(tmp_path, key):
    with pytest.raises(ValueError, match="not a plain name"):
        leases.acquire_lease(tmp_path / "ds", key)
    with pytest.raises(ValueError, match="not a plain name"), leases.read_lease(tmp_path / "ds", key):
        pass
    assert not (tmp_path / "ds" / ".leases").exists() or not any((tmp_path / "ds" / ".leases").iterdir())
