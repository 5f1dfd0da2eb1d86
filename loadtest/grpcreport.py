"""ghz's report: the JSON document, the summary text and the CSV, from recorded calls.

Field names, units and status names follow ghz's output documentation so that scripts and
dashboards built for ghz read ours: durations are integer nanoseconds (Go's `time.Duration`),
except the histogram's `mark` (seconds); status names are Go's `codes.Code` strings; `rps` is
count / total; latency statistics cover OK calls unless errors are counted (`--count-errors`).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import grpc

# Go's codes.Code.String(), what ghz writes in statusCodeDistribution and details.
GO_CODE_NAMES = {
    grpc.StatusCode.OK: "OK",
    grpc.StatusCode.CANCELLED: "Canceled",
    grpc.StatusCode.UNKNOWN: "Unknown",
    grpc.StatusCode.INVALID_ARGUMENT: "InvalidArgument",
    grpc.StatusCode.DEADLINE_EXCEEDED: "DeadlineExceeded",
    grpc.StatusCode.NOT_FOUND: "NotFound",
    grpc.StatusCode.ALREADY_EXISTS: "AlreadyExists",
    grpc.StatusCode.PERMISSION_DENIED: "PermissionDenied",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "ResourceExhausted",
    grpc.StatusCode.FAILED_PRECONDITION: "FailedPrecondition",
    grpc.StatusCode.ABORTED: "Aborted",
    grpc.StatusCode.OUT_OF_RANGE: "OutOfRange",
    grpc.StatusCode.UNIMPLEMENTED: "Unimplemented",
    grpc.StatusCode.INTERNAL: "Internal",
    grpc.StatusCode.UNAVAILABLE: "Unavailable",
    grpc.StatusCode.DATA_LOSS: "DataLoss",
    grpc.StatusCode.UNAUTHENTICATED: "Unauthenticated",
}
PERCENTAGES = (10, 25, 50, 75, 90, 95, 99)
HISTOGRAM_BUCKETS = 10


@dataclass
class Call:
    """One request: when it started (Unix ns), how long it took (ns), its status and error."""

    timestamp_ns: int
    latency_ns: int
    status: str = "OK"
    error: str = ""


def rfc3339(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).isoformat().replace("+00:00", "Z")


def error_text(code: grpc.StatusCode, details: str | None) -> str:
    """ghz prints Go's status error: ``rpc error: code = X desc = ...``."""
    return f"rpc error: code = {GO_CODE_NAMES.get(code, str(code))} desc = {details or ''}"


@dataclass
class Report:
    calls: list[Call]
    total_ns: int
    options: dict
    date_ns: int
    end_reason: str = "normal"  # normal | timeout | cancel
    count_errors: bool = False
    name: str = ""
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return len(self.calls)

    def _timed(self) -> list[int]:
        calls = self.calls if self.count_errors else [c for c in self.calls if c.status == "OK"]
        return sorted(c.latency_ns for c in calls)

    @property
    def rps(self) -> float:
        return self.count / (self.total_ns / 1e9) if self.total_ns > 0 else 0.0

    def latency_distribution(self) -> list[dict]:
        lat = self._timed()
        if not lat:
            return []
        out = []
        for p in PERCENTAGES:
            rank = max(1, math.ceil(len(lat) * p / 100))
            out.append({"percentage": p, "latency": lat[rank - 1]})
        return out

    def histogram(self) -> list[dict]:
        lat = self._timed()
        if not lat:
            return []
        fastest, slowest = lat[0], lat[-1]
        step = (slowest - fastest) / HISTOGRAM_BUCKETS
        marks = [fastest + step * i for i in range(HISTOGRAM_BUCKETS + 1)]
        counts = [0] * len(marks)
        for v in lat:
            i = 0 if step == 0 else min(len(marks) - 1, math.ceil((v - fastest) / step))
            counts[i] += 1
        return [
            {"mark": m / 1e9, "count": n, "frequency": n / len(lat)}
            for m, n in zip(marks, counts, strict=True)
        ]

    def to_ghz(self) -> dict:
        lat = self._timed()
        doc = {
            "date": rfc3339(self.date_ns),
            "endReason": self.end_reason,
            "options": self.options,
            "count": self.count,
            "total": self.total_ns,
            "average": int(sum(lat) / len(lat)) if lat else 0,
            "fastest": lat[0] if lat else 0,
            "slowest": lat[-1] if lat else 0,
            "rps": self.rps,
            "errorDistribution": dict(Counter(c.error for c in self.calls if c.error)),
            "statusCodeDistribution": dict(Counter(c.status for c in self.calls)),
            "latencyDistribution": self.latency_distribution(),
            "histogram": self.histogram(),
            "details": [
                {
                    "timestamp": rfc3339(c.timestamp_ns),
                    "latency": c.latency_ns,
                    "error": c.error,
                    "status": c.status,
                }
                for c in self.calls
            ],
        }
        if self.name:
            doc["name"] = self.name
        if self.tags:
            doc["tags"] = self.tags
        return doc


def fmt_ns(ns: float) -> str:
    """Like ghz's summary: ms for most things, s past a second, µs below a millisecond."""
    if ns >= 1e9:
        return f"{ns / 1e9:.2f} s"
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    return f"{ns / 1e3:.2f} µs"


def summary(report: Report) -> str:
    doc = report.to_ghz()
    lines = ["", "Summary:"]
    if report.name:
        lines.append(f"  Name:\t{report.name}")
    lines += [
        f"  Count:\t{doc['count']}",
        f"  Total:\t{fmt_ns(doc['total'])}",
        f"  Slowest:\t{fmt_ns(doc['slowest'])}",
        f"  Fastest:\t{fmt_ns(doc['fastest'])}",
        f"  Average:\t{fmt_ns(doc['average'])}",
        f"  Requests/sec:\t{doc['rps']:.2f}",
        "",
        "Response time histogram:",
    ]
    hist = doc["histogram"]
    top = max((b["count"] for b in hist), default=0)
    for b in hist:
        bar = "∎" * (round(40 * b["count"] / top) if top else 0)
        lines.append(f"  {b['mark'] * 1000:<8.3f} [{b['count']}]\t|{bar}")
    lines += ["", "Latency distribution:"]
    lines += [
        f"  {d['percentage']} % in {fmt_ns(d['latency'])} " for d in doc["latencyDistribution"]
    ]
    lines += ["", "Status code distribution:"]
    lines += [f"  [{k}]\t{v} responses" for k, v in doc["statusCodeDistribution"].items()]
    if doc["errorDistribution"]:
        lines += ["", "Error distribution:"]
        lines += [f"  [{v}]\t{k}" for k, v in doc["errorDistribution"].items()]
    lines.append("")
    return "\n".join(lines)


def to_csv(calls: Sequence[Call]) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["duration (ms)", "status", "error"])
    for c in calls:
        w.writerow([f"{c.latency_ns / 1e6:.2f}", c.status, c.error])
    return out.getvalue()


def render(report: Report, fmt: str) -> str:
    if fmt == "summary":
        return summary(report)
    if fmt == "json":
        return json.dumps(report.to_ghz())
    if fmt == "pretty":
        return json.dumps(report.to_ghz(), indent=2, ensure_ascii=False)
    if fmt == "csv":
        return to_csv(report.calls)
    raise ValueError(f"unknown output format {fmt!r}: use summary, json, pretty or csv")
