"""IngestJobs without HTTP: order, per-document errors, bounds, retention. A test double
stands in for ``Documents``; the same jobs run over the real stack in
tests/integration/test_knowledge_base.py."""

from __future__ import annotations

import asyncio

import pytest

from ragline.errors import InvalidArgument, NotFound, ResourceExhausted
from services.api.ingest import IngestResult
from services.api.jobs import IngestJobs, JobDocument


class FakeDocuments:
    def __init__(self) -> None:
        self.done: list[tuple[str, str]] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def add_text(self, document_id, text, metadata=None, *, collection=None):
        await self.gate.wait()
        if not text.strip():
            raise InvalidArgument(f"document {document_id!r} has no text to ingest")
        self.done.append((collection, document_id))
        return IngestResult(document_id, "ingested", 1)

    async def add_file(self, data, name, document_id=None, *, collection=None):
        if name.endswith(".boom"):
            raise RuntimeError("a bug")
        return await self.add_text(document_id or name, data.decode(), collection=collection)


async def finished(jobs: IngestJobs, job_id: str) -> dict:
    for _ in range(200):
        body = jobs.get(job_id).to_dict()
        if body["finished_at"]:
            return body
        await asyncio.sleep(0.01)
    raise AssertionError("job did not finish")


async def test_a_job_ingests_in_order_and_records_each_failure_without_stopping() -> None:
    docs = FakeDocuments()
    jobs = IngestJobs(docs)
    try:
        job = jobs.submit("hr", [JobDocument("a.md", data=b"A"), JobDocument("b.md", data=b" "),
                                 JobDocument("c.boom", data=b"C"),
                                 JobDocument("t", text="T", document_id="t1")])  # fmt: skip
        assert job.status == "queued" and job.to_dict()["documents"] == 4
        body = await finished(jobs, job.id)
        assert body["status"] == "partial" and body["done"] == 4
        assert docs.done == [("hr", "a.md"), ("hr", "t1")]
        assert [e["document"] for e in body["errors"]] == ["b.md", "c.boom"]
        assert body["errors"][0]["code"] == "invalid_argument"
        assert body["errors"][1]["code"] == "internal" and "a bug" not in str(body)
        ok = jobs.submit("hr", [JobDocument("d.md", data=b"D")])
        assert (await finished(jobs, ok.id))["status"] == "succeeded"
        bad = jobs.submit("hr", [JobDocument("e.md", data=b"")])
        assert (await finished(jobs, bad.id))["status"] == "failed"
        assert [j.id for j in jobs.list()] == [bad.id, ok.id, job.id], "newest first"
        with pytest.raises(NotFound, match="GET /jobs"):
            jobs.get("job-nope")
    finally:
        await jobs.close()


async def test_waiting_jobs_are_bounded_and_old_finished_ones_forgotten() -> None:
    docs = FakeDocuments()
    jobs = IngestJobs(docs, max_queued=2, keep=1)
    try:
        docs.gate.clear()  # the first job holds the worker
        running = jobs.submit("hr", [JobDocument("a.md", data=b"A")])
        await asyncio.sleep(0.01)
        assert running.status == "running"
        waiting = [jobs.submit("hr", [JobDocument(f"{i}.md", data=b"x")]) for i in range(2)]
        with pytest.raises(ResourceExhausted, match="2 ingestion jobs are already waiting"):
            jobs.submit("hr", [JobDocument("z.md", data=b"z")])
        docs.gate.set()
        await finished(jobs, waiting[-1].id)
        assert [j.id for j in jobs.list()] == [waiting[-1].id], "one finished job kept"
    finally:
        await jobs.close()
