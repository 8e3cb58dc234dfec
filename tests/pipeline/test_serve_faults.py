"""``omnisage serve`` under faults: an id beyond int64 is a 4xx, error bodies name no server path, a bad
newest day (truncated index, broken manifest) is skipped for the newest good one with /healthz degraded and
one log line, and a store where no reader lease can be written (read-only) is still served."""

from __future__ import annotations

import errno
import logging
import os
import re
import tempfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from test_serving import publish_embeddings, random_source, random_users

from omnisage_pipeline.serving.build import CheckParams, build_day_index
from omnisage_pipeline.serving.index import IndexParams
from omnisage_pipeline.serving.service import IndexHolder, create_app
from omnisage_pipeline.storage import retention
from omnisage_pipeline.storage.publish import published_path

DAY, NEXT_DAY = "2026-01-01", "2026-01-02"
PIN_BASE = 10**12  # test_serving.random_source: pin ids PIN_BASE + 7 i
ROUTES = ["/v1/related/pin/{}", "/v1/related/board/{}", "/v1/boards/pin/{}", "/v1/homefeed/user/{}"]


def build_days(home: Path, *days: str) -> None:
    for i, day in enumerate(days):
        publish_embeddings(home, day, random_source(i, pins=300, boards=60), random_users(i), str(i + 1))
        build_day_index(
            home / "embeddings", home / "user_embeddings", home / "indexes", day, IndexParams(), CheckParams()
        )


def assert_no_server_path(text: str, *paths: Path) -> None:
    for p in (*paths, tempfile.gettempdir(), os.getcwd()):
        assert str(p) not in text, (p, text)
    assert not re.search(r"(^|[\s'\"(])/[\w.-]+/", text), text  # no absolute file path at all (a route may be)


def patch_lease_acquisition(monkeypatch, acquire) -> None:
    """Replace the lease acquisition wherever ``retention.read_lease`` may take it from."""
    import importlib

    monkeypatch.setattr(retention, "acquire_lease", acquire)
    try:  # the lease helpers may live in their own module, re-exported by retention
        leases = importlib.import_module("omnisage_pipeline.storage.leases")
    except ImportError:
        return
    monkeypatch.setattr(leases, "acquire_lease", acquire)


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("faults") / "home"
    build_days(home, DAY)
    return home


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("bad_id", ["99999999999999999999999", str(2**63), str(-(2**63) - 1)])
def test_an_id_beyond_int64_answers_4xx(served, route, bad_id):
    holder = IndexHolder(served / "indexes")
    with TestClient(create_app(holder, start_polling=False), raise_server_exceptions=False) as client:
        assert holder.refresh()
        response = client.get(route.format(bad_id))
        assert response.status_code in (400, 422), response.text
        assert client.get(route.format(2**63 - 1)).status_code == 404  # int64 max itself: a valid, unknown id


def test_no_index_yet_answers_503_without_a_server_path(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("OMNISAGE_HOME", str(home))
    holder = IndexHolder(home / "indexes")
    with TestClient(create_app(holder, start_polling=False)) as client:
        assert not holder.refresh()
        for path in ("/v1/related/pin/1", "/v1/homefeed/user/-3", "/healthz"):
            response = client.get(path)
            assert response.status_code == 503
            assert_no_server_path(response.text, home, tmp_path)
        assert client.get("/healthz").json()["status"] == "unavailable"


def _truncate_pin_index(version: Path) -> None:
    data = (version / "pin.faiss").read_bytes()
    (version / "pin.faiss").write_bytes(data[: len(data) // 2])


def _break_manifest(version: Path) -> None:
    (version / "manifest.json").write_text('{"partition": ')


@pytest.mark.parametrize("corrupt", [_truncate_pin_index, _break_manifest], ids=["truncated_index", "manifest"])
def test_a_corrupt_newest_day_serves_the_older_one_degraded(tmp_path, caplog, corrupt):
    home = tmp_path / "home"
    build_days(home, DAY, NEXT_DAY)
    corrupt(published_path(home / "indexes", NEXT_DAY))
    holder = IndexHolder(home / "indexes", poll_seconds=3600)  # polls are driven by hand below
    caplog.set_level(logging.INFO, logger="omnisage.serve")
    with TestClient(create_app(holder)) as client:  # startup (holder.start) survives the bad day
        for _ in range(3):  # later polls: the bad version is neither reloaded nor logged again
            assert not holder.refresh()
        health = client.get("/healthz")
        assert health.status_code == 200
        body = health.json()
        assert body["status"] == "degraded" and body["partition"] == DAY
        [skipped] = body["skipped"]
        assert skipped["day"] == NEXT_DAY and skipped["reason"]
        assert_no_server_path(health.text, home, tmp_path)
        answer = client.get(f"/v1/related/pin/{PIN_BASE}")
        assert answer.status_code == 200 and answer.json()["partition"] == DAY
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and f"dt={NEXT_DAY}" in errors[0].getMessage()
        # a good re-publish of the bad day is picked up and the service is healthy again
        build_days(home, DAY, NEXT_DAY)
        assert holder.refresh()
        body = client.get("/healthz").json()
        assert body["status"] == "ok" and body["partition"] == NEXT_DAY and body["skipped"] == []


def test_a_bad_republish_of_the_served_day_keeps_it_rather_than_an_older_day(tmp_path):
    home = tmp_path / "home"
    build_days(home, DAY, NEXT_DAY)
    holder = IndexHolder(home / "indexes")
    assert holder.refresh() and holder.partition == NEXT_DAY
    build_days(home, DAY, NEXT_DAY)  # a new version of both days; the newest one is broken
    _truncate_pin_index(published_path(home / "indexes", NEXT_DAY))
    assert not holder.refresh()
    assert holder.partition == NEXT_DAY and [s["day"] for s in holder.skipped] == [NEXT_DAY]


@pytest.mark.parametrize(
    "error",
    [PermissionError(errno.EACCES, "Permission denied"), OSError(errno.EROFS, "Read-only file system")],
    ids=["permission", "read_only"],
)
def test_a_store_without_writable_leases_is_served(served, monkeypatch, caplog, error):
    from omnisage_pipeline.serving import neighbors

    def no_lease(dataset_dir, partition_key):
        raise error

    patch_lease_acquisition(monkeypatch, no_lease)
    monkeypatch.setattr(neighbors, "_warned_unleased", set())
    caplog.set_level(logging.INFO, logger="omnisage.serve")
    holder = IndexHolder(served / "indexes")
    with TestClient(create_app(holder, start_polling=False)) as client:
        assert holder.refresh()
        holder._target = None  # force a second load of the same day: the warning is not repeated
        assert holder.refresh()
        response = client.get(f"/v1/related/pin/{PIN_BASE}")
        assert response.status_code == 200 and len(response.json()["items"]) == 10
        assert client.get("/healthz").json()["status"] == "ok"
    warnings = [r for r in caplog.records if "lease" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert not (served / "indexes" / retention.LEASES_DIR).is_dir() or not any(
        (served / "indexes" / retention.LEASES_DIR).iterdir()
    )


def test_other_lease_errors_still_fail_the_load(served, monkeypatch):
    from omnisage_pipeline.serving import neighbors

    def broken(dataset_dir, partition_key):
        raise OSError(errno.EIO, "I/O error")

    patch_lease_acquisition(monkeypatch, broken)
    with pytest.raises(OSError, match="I/O error"):
        neighbors.open_index(served / "indexes", DAY)


def _chmod_protects() -> bool:
    """False where write permission bits are ignored (root with CAP_DAC_OVERRIDE)."""
    with tempfile.TemporaryDirectory() as d:
        probe = Path(d) / "probe"
        probe.write_text("")
        probe.chmod(0o444)
        try:
            probe.open("a").close()
        except PermissionError:
            return True
        return False


@pytest.mark.skipif(not _chmod_protects(), reason="chmod is ineffective (root): see the monkeypatched tests")
def test_a_chmod_read_only_store_is_served(tmp_path):
    home = tmp_path / "home"
    build_days(home, DAY)
    paths = [home / "indexes", *(home / "indexes").rglob("*")]
    try:
        for p in paths:
            if not p.is_symlink():
                p.chmod(p.stat().st_mode & ~0o222)
        holder = IndexHolder(home / "indexes")
        with TestClient(create_app(holder, start_polling=False)) as client:
            assert holder.refresh()
            assert client.get(f"/v1/related/pin/{PIN_BASE}").status_code == 200
    finally:
        for p in paths:
            if not p.is_symlink():
                p.chmod(p.stat().st_mode | 0o200)


def test_public_reason_cuts_paths():
    from omnisage_pipeline.serving.service import public_reason

    exc = RuntimeError("Error in f at /project/faiss/io.cpp:68: read error in /tmp/x/.versions/dt=1/pin.faiss")
    reason = public_reason(exc)
    assert "pin.faiss" in reason and "/tmp" not in reason and "/project" not in reason
    assert reason.startswith("RuntimeError: Error in f at io.cpp:68")
