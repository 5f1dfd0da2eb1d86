"""Ingestion jobs: a large upload answered at once (202) and ingested in the background, with
a status a client polls (``GET /jobs/{id}``), as NVIDIA's RAG blueprint does for documents.

One worker per edge ingests the jobs in the order they came, one document at a time; a
document that fails is recorded with its error and the job goes on. Bounded: at most
``max_queued`` jobs wait (then ``ResourceExhausted``, a 429), and the ``keep`` most recent
finished jobs are remembered. Jobs live in the edge process: a restart forgets them (the
documents they ingested stay ingested; re-sending a job skips the unchanged ones).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from ragline.errors import NotFound, RaglineError, ResourceExhausted
from services.api.collections import iso_time
from services.api.ingest import Documents

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobDocument:
    """One document of a job: a file's bytes (decoded by its name's suffix) or a text."""

    name: str  # the file name, or the document id of a text
    data: bytes | None = None
    text: str | None = None
    document_id: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class Job:
    id: str
    collection: str
    documents: list[JobDocument]
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    results: list[dict[str, object]] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)

    @property
    def status(self) -> str:
        """queued, running, succeeded, partial (some documents failed) or failed (all did)."""
        if self.started_at is None:
            return "queued"
        if self.finished_at is None:
            return "running"
        if not self.errors:
            return "succeeded"
        return "failed" if not self.results else "partial"

    def to_dict(self) -> dict[str, object]:
        return {
            "job_id": self.id,
            "collection": self.collection,
            "status": self.status,
            "documents": len(self.documents),
            "done": len(self.results) + len(self.errors),
            "results": self.results,
            "errors": self.errors,
            "created_at": _iso_s(self.created_at),
            "started_at": _iso_s(self.started_at),
            "finished_at": _iso_s(self.finished_at),
        }


class IngestJobs:
    def __init__(self, documents: Documents, max_queued: int = 16, keep: int = 100) -> None:
        self.documents = documents
        self.max_queued = max_queued
        self.keep = keep
        self._jobs: OrderedDict[str, Job] = OrderedDict()  # oldest first
        self._queue: asyncio.Queue[Job] | None = None
        self._worker: asyncio.Task | None = None
        self._serial = itertools.count(1)

    def submit(self, collection: str, documents: list[JobDocument]) -> Job:
        """Queues the job (the collection must exist when it runs) and returns it at once."""
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.create_task(self._run(), name="ingest-jobs")
        if self._queue.qsize() >= self.max_queued:
            raise ResourceExhausted(
                f"{self.max_queued} ingestion jobs are already waiting: poll GET /jobs and "
                "send this one when they are done"
            )
        job = Job(f"job-{next(self._serial)}-{secrets.token_hex(4)}", collection, documents)
        self._jobs[job.id] = job
        self._forget_old()
        self._queue.put_nowait(job)
        return job

    def get(self, job_id: str) -> Job:
        if job_id not in self._jobs:
            raise NotFound(
                f"no ingestion job {job_id!r} on this edge (GET /jobs lists them; an edge "
                "restart forgets its jobs)"
            )
        return self._jobs[job_id]

    def list(self) -> list[Job]:
        """Newest first."""
        return list(reversed(self._jobs.values()))

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)

    def _forget_old(self) -> None:
        finished = [j.id for j in self._jobs.values() if j.finished_at is not None]
        for job_id in finished[: max(0, len(finished) - self.keep)]:
            del self._jobs[job_id]

    async def _run(self) -> None:
        assert self._queue is not None
        while True:
            job = await self._queue.get()
            job.started_at = time.time()
            for doc in job.documents:
                try:
                    if doc.data is not None:
                        done = await self.documents.add_file(
                            doc.data, doc.name, doc.document_id, collection=job.collection
                        )
                    else:
                        done = await self.documents.add_text(
                            doc.document_id, doc.text or "", doc.metadata,
                            collection=job.collection,
                        )  # fmt: skip
                    job.results.append(done.to_dict())
                except RaglineError as exc:
                    job.errors.append({"document": doc.name, "code": exc.grpc_code.lower(),
                                       "message": exc.message})  # fmt: skip
                except Exception as exc:  # a bug: recorded, and the worker lives on
                    log.exception("ingestion job %s: document %s", job.id, doc.name)
                    problem = f"internal error ({type(exc).__name__}): see the edge log"
                    job.errors.append({"document": doc.name, "code": "internal",
                                       "message": problem})  # fmt: skip
            job.finished_at = time.time()
            self._forget_old()


def _iso_s(unix_s: float | None) -> str | None:
    return None if unix_s is None else iso_time(int(unix_s * 1000))
