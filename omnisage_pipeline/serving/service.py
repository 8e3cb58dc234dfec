"""``omnisage serve``: the newest published index over HTTP (FastAPI + uvicorn, loopback by default).

Routes (each answers ``{"partition", "model_version", "items": [{"id", "type", "score"}]}``; 404 for an id not
in the index, 422 for k outside 1..1000; OpenAPI at ``/docs``)::

    GET /v1/related/pin/{id}?k=10      pins near a pin
    GET /v1/related/board/{id}?k=10    boards near a board
    GET /v1/boards/pin/{id}?k=10       boards for a pin
    GET /v1/homefeed/user/{id}?k=10    pin candidates from the user's sequence embedding
    GET /healthz                       the loaded partition (503 while none is loaded)

Ids are the contract's int64, negative ones included (``/v1/related/pin/-5``); a path id outside the int64
range answers 422. Error bodies name no server path (the server log has the details).

``/healthz``: ``{"status": "ok", "partition", "model_version", "version", "counts", "skipped": []}``; 200 with
``"status": "degraded"`` when a newer published day could not be loaded and an older one is served
(``"skipped": [{"day", "reason"}]``); 503 with ``"status": "unavailable"`` while no day is loaded.

Day switch: ``IndexHolder`` keeps one immutable ``LoadedIndex``; a background thread looks every
``poll_seconds`` at the ``indexes/dt=D`` links from the newest down to the served day (readlinks, no file
read) and, when the newest names another version, loads it completely and then replaces the holder's
reference (one assignment, atomic in Python). A request takes the reference once and answers from that
object, so a request in flight during a swap finishes on the old index, and the next one uses the new. The
index files of an old version may be removed (retention, a re-publish) while it is still loaded: the index is
in memory, and memory-mapped vectors stay readable after their file is unlinked (POSIX).

A bad day (a truncated or unreadable index file, a broken manifest) does not stop the service: the newest
day that loads is served, never one older than the day served now while that day is still published. The
bad version is logged once (not at every poll) and listed by ``/healthz`` until a good version of a day at
least as new is published. A read-only store is served without reader leases (``neighbors.open_index``).
"""

from __future__ import annotations

import logging
import os
import re
import threading
from contextlib import asynccontextmanager
from pathlib import Path, PurePath
from typing import Annotated

from fastapi import FastAPI, HTTPException, Query
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from omnisage_pipeline.serving.index import LoadedIndex
from omnisage_pipeline.serving.neighbors import (
    INT64_MAX,
    INT64_MIN,
    MAX_K,
    ROUTES,
    UnknownEntityError,
    nearest,
    open_index,
    published_target,
)
from omnisage_pipeline.storage.publish import list_published

log = logging.getLogger("omnisage.serve")

EntityId = Annotated[int, PathParam(ge=INT64_MIN, le=INT64_MAX, description="the contract's int64 id")]
K = Annotated[int, Query(ge=1, le=MAX_K, description="number of results (1..1000)")]


class Item(BaseModel):
    id: int
    type: str
    score: float


class Answer(BaseModel):
    partition: str
    model_version: str
    items: list[Item]


_PATH = re.compile(r"(?:/[^\s'\"]+)+")


def public_reason(exc: BaseException) -> str:
    """The first line of an error with every absolute path cut to its file name (for HTTP bodies)."""
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    return _PATH.sub(lambda m: PurePath(m.group()).name, text)[:300]


class IndexHolder:
    """The service's current index: replaced as a whole, never modified (module docstring). ``skipped``:
    the published days, at least as new as the served one, whose version failed to load (``{"day",
    "reason"}``)."""

    def __init__(self, indexes_dir: Path, poll_seconds: float = 10.0):
        self.indexes_dir = Path(indexes_dir)
        self.poll_seconds = poll_seconds
        self.current: LoadedIndex | None = None
        self.skipped: list[dict] = []
        self._target: tuple[str, str | None] | None = None
        self._bad: dict[tuple[str, str | None], str] = {}  # published version -> why it did not load
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self) -> bool:
        """Load the newest published day that loads, if it is not the one served; True when the reference
        was swapped. A version that fails is remembered (logged once, not retried) and listed in
        ``skipped``."""
        days = list_published(self.indexes_dir)
        current = self.current
        # A failing new version of the served day keeps the served one (in memory), not an older day.
        floor = current.partition if current is not None and current.partition in days else None
        bad: dict[tuple[str, str | None], str] = {}
        skipped: list[dict] = []
        try:
            for day in reversed(days):
                target = (day, published_target(self.indexes_dir, day))
                if target == self._target or (floor is not None and day < floor):
                    return False
                if target not in self._bad:
                    try:
                        loaded = open_index(self.indexes_dir, day)
                    except Exception as exc:  # noqa: BLE001 - any unreadable day is skipped, never fatal
                        if published_target(self.indexes_dir, day) != target[1]:
                            continue  # replaced or removed while read: the next poll sees the new state
                        self._bad[target] = public_reason(exc)
                        log.error("skipping index dt=%s (%s): cannot load it: %s", day, target[1], exc)
                    else:
                        self.current, self._target = loaded, target  # the swap: one reference assignment
                        log.info(
                            "serving index dt=%s (model %s) from %s",
                            loaded.partition,
                            loaded.model_version,
                            loaded.path,
                        )
                        return True
                bad[target] = self._bad[target]
                skipped.append({"day": day, "reason": bad[target]})
            return False
        finally:  # only the versions still published (and newer than the served one) are remembered
            self._bad, self.skipped = bad, skipped

    def _poll(self) -> None:
        try:  # Linux: nice is per thread; loading a new day must not take CPU from the requests
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except (AttributeError, OSError):
            pass
        while not self._stop.wait(self.poll_seconds):
            try:
                self.refresh()
            except Exception:
                log.exception("could not load the newest index; still serving dt=%s", self.partition)

    @property
    def partition(self) -> str | None:
        return self.current.partition if self.current else None

    def start(self) -> None:
        self.refresh()
        if self.current is None:
            log.warning("no loadable index under %s; answering 503 until one is published", self.indexes_dir)
        self._thread = threading.Thread(target=self._poll, name="index-poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def create_app(holder: IndexHolder, start_polling: bool = True, faiss_threads: int = 1) -> FastAPI:
    """The FastAPI app over ``holder`` (``start_polling=False``: the caller refreshes, as the tests do).

    ``faiss_threads``: OpenMP threads per search. OpenMP keeps this setting per native thread, so each
    worker thread of the pool sets it on its first request (otherwise it would use every core per query
    and the concurrent requests would spin against each other)."""
    import faiss

    per_thread = threading.local()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if start_polling:
            holder.start()
        yield
        holder.stop()

    app = FastAPI(title="OmniSage embeddings", version="1", lifespan=lifespan)

    def answer(route: str, entity_id: int, k: int) -> Answer:
        if not getattr(per_thread, "threads_set", False):
            faiss.omp_set_num_threads(faiss_threads)
            per_thread.threads_set = True
        loaded = holder.current  # taken once: a swap during this request does not affect it
        if loaded is None:  # the folder is in the server log, not in the answer
            raise HTTPException(503, "no index loaded yet: none is published, or none loads (see /healthz)")
        source, target = ROUTES[route]
        try:
            items = nearest(loaded, source, entity_id, target, k)
        except UnknownEntityError as exc:
            raise HTTPException(404, str(exc)) from exc
        return Answer(
            partition=loaded.partition, model_version=loaded.model_version, items=[Item(**n.to_dict()) for n in items]
        )

    @app.get("/v1/related/pin/{id}", response_model=Answer, summary="pins near a pin")
    def related_pin(id: EntityId, k: K = 10) -> Answer:
        return answer("related_pin", id, k)

    @app.get("/v1/related/board/{id}", response_model=Answer, summary="boards near a board")
    def related_board(id: EntityId, k: K = 10) -> Answer:
        return answer("related_board", id, k)

    @app.get("/v1/boards/pin/{id}", response_model=Answer, summary="boards for a pin")
    def boards_for_pin(id: EntityId, k: K = 10) -> Answer:
        return answer("boards_for_pin", id, k)

    @app.get("/v1/homefeed/user/{id}", response_model=Answer, summary="homefeed pin candidates for a user")
    def homefeed(id: EntityId, k: K = 10) -> Answer:
        return answer("homefeed", id, k)

    @app.get("/healthz", summary="the loaded partition; degraded when newer days failed to load")
    def healthz():
        loaded, skipped = holder.current, list(holder.skipped)
        if loaded is None:
            return JSONResponse({"status": "unavailable", "detail": "no index loaded", "skipped": skipped}, 503)
        return {
            "status": "degraded" if skipped else "ok",
            "partition": loaded.partition,
            "model_version": loaded.model_version,
            "version": loaded.path.name,
            "counts": loaded.manifest.get("counts", {}),
            "skipped": skipped,
        }

    return app


def serve(
    indexes_dir: Path, host: str = "127.0.0.1", port: int = 8080, poll_seconds: float = 10.0, faiss_threads: int = 1
) -> None:
    """Run the app with uvicorn (one process; FastAPI runs the handlers in its thread pool, and FAISS
    releases the GIL while it searches)."""
    import faiss
    import uvicorn

    # One thread per search: concurrency comes from concurrent requests, not from OpenMP inside one query.
    faiss.omp_set_num_threads(faiss_threads)
    app = create_app(IndexHolder(indexes_dir, poll_seconds), faiss_threads=faiss_threads)
    uvicorn.run(app, host=host, port=port, log_level="warning")
