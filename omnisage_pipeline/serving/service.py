"""``omnisage serve``: the newest published index over HTTP (FastAPI + uvicorn, loopback by default).

Routes (each answers ``{"partition", "model_version", "items": [{"id", "type", "score"}]}``; 404 for an id not
in the index, 422 for k outside 1..1000; OpenAPI at ``/docs``)::

    GET /v1/related/pin/{id}?k=10      pins near a pin
    GET /v1/related/board/{id}?k=10    boards near a board
    GET /v1/boards/pin/{id}?k=10       boards for a pin
    GET /v1/homefeed/user/{id}?k=10    pin candidates from the user's sequence embedding
    GET /healthz                       the loaded partition (503 while none is loaded)

Day switch: ``IndexHolder`` keeps one immutable ``LoadedIndex``; a background thread looks every
``poll_seconds`` at the newest ``indexes/dt=D`` link (a readlink, no file read) and, when it names another
version, loads it completely and then replaces the holder's reference (one assignment, atomic in Python). A
request takes the reference once and answers from that object, so a request in flight during a swap finishes
on the old index, and the next one uses the new. The index files of an old version may be removed
(retention, a re-publish) while it is still loaded: the index is in memory, and memory-mapped vectors stay
readable after their file is unlinked (POSIX).
"""

from __future__ import annotations

import logging
import os
import threading
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, HTTPException, Query
from fastapi import Path as PathParam
from pydantic import BaseModel

from omnisage_pipeline.serving.index import LoadedIndex
from omnisage_pipeline.serving.neighbors import (
    MAX_K,
    ROUTES,
    NoIndexError,
    UnknownEntityError,
    nearest,
    newest_partition,
    open_index,
    published_target,
)

log = logging.getLogger("omnisage.serve")

EntityId = Annotated[int, PathParam(description="the contract's int64 id")]
K = Annotated[int, Query(ge=1, le=MAX_K, description="number of results (1..1000)")]


class Item(BaseModel):
    id: int
    type: str
    score: float


class Answer(BaseModel):
    partition: str
    model_version: str
    items: list[Item]


class IndexHolder:
    """The service's current index: replaced as a whole, never modified (module docstring)."""

    def __init__(self, indexes_dir: Path, poll_seconds: float = 10.0):
        self.indexes_dir = Path(indexes_dir)
        self.poll_seconds = poll_seconds
        self.current: LoadedIndex | None = None
        self._target: tuple[str, str | None] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self) -> bool:
        """Load the newest published index if it changed; True when the reference was swapped."""
        day = newest_partition(self.indexes_dir)
        target = (day, published_target(self.indexes_dir, day)) if day else None
        if target is None or target == self._target:
            return False
        loaded = open_index(self.indexes_dir, day)
        self.current, self._target = loaded, target  # the swap: one reference assignment
        log.info(
            "serving index dt=%s (model %s) from %s", loaded.partition, loaded.model_version, loaded.path
        )
        return True

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
        try:
            self.refresh()
        except NoIndexError as exc:
            log.warning("%s; answering 503 until one is published", exc)
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
        if loaded is None:
            raise HTTPException(503, f"no published index under {holder.indexes_dir} yet")
        source, target = ROUTES[route]
        try:
            items = nearest(loaded, source, entity_id, target, k)
        except UnknownEntityError as exc:
            raise HTTPException(404, str(exc)) from exc
        return Answer(partition=loaded.partition, model_version=loaded.model_version,
                      items=[Item(**n.to_dict()) for n in items])  # fmt: skip

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

    @app.get("/healthz", summary="the loaded partition")
    def healthz() -> dict:
        loaded = holder.current
        if loaded is None:
            raise HTTPException(503, "no index loaded")
        return {"status": "ok", "partition": loaded.partition, "model_version": loaded.model_version,
                "version": loaded.path.name,
                "counts": loaded.manifest.get("counts", {})}  # fmt: skip

    return app


def serve(indexes_dir: Path, host: str = "127.0.0.1", port: int = 8080, poll_seconds: float = 10.0,
          faiss_threads: int = 1) -> None:  # fmt: skip
    """Run the app with uvicorn (one process; FastAPI runs the handlers in its thread pool, and FAISS
    releases the GIL while it searches)."""
    import faiss
    import uvicorn

    # One thread per search: concurrency comes from concurrent requests, not from OpenMP inside one query.
    faiss.omp_set_num_threads(faiss_threads)
    app = create_app(IndexHolder(indexes_dir, poll_seconds), faiss_threads=faiss_threads)
    uvicorn.run(app, host=host, port=port, log_level="warning")
