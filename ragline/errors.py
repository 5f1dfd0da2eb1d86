"""Domain errors shared by every service.

Domain objects raise these; one interceptor (``ragline.grpc_server``) maps them to gRPC status
codes and the HTTP edge maps them to 4xx/5xx. The message must say what to fix.
"""

from __future__ import annotations


class RaglineError(Exception):
    """Base class: ``grpc_code`` names a ``grpc.StatusCode`` member; ``http_status`` is its twin."""

    grpc_code = "INTERNAL"
    http_status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(RaglineError):
    grpc_code = "INVALID_ARGUMENT"
    http_status = 400


class NotFound(RaglineError):
    grpc_code = "NOT_FOUND"
    http_status = 404


class PermissionDenied(RaglineError):
    grpc_code = "PERMISSION_DENIED"
    http_status = 403


class AlreadyExists(RaglineError):
    grpc_code = "ALREADY_EXISTS"
    http_status = 409


class FailedPrecondition(RaglineError):
    grpc_code = "FAILED_PRECONDITION"
    http_status = 409


class ResourceExhausted(RaglineError):
    grpc_code = "RESOURCE_EXHAUSTED"
    http_status = 429


class DeadlineExceeded(RaglineError):
    grpc_code = "DEADLINE_EXCEEDED"
    http_status = 504


class Unavailable(RaglineError):
    grpc_code = "UNAVAILABLE"
    http_status = 503


class Cancelled(RaglineError):
    grpc_code = "CANCELLED"
    http_status = 499


class StageError(RaglineError):
    """A stage answered with an error status (``ragline.clients`` raises it for every failed
    call): the stage's name, its status code name and message, and the HTTP status the edge
    answers with. An upstream INTERNAL or an unknown code is 502 (bad gateway)."""

    def __init__(self, stage: str, grpc_code: str, detail: str) -> None:
        if grpc_code == "UNAVAILABLE":
            detail = f"{stage} stage is unreachable or not ready: {detail}"
        super().__init__(f"{stage}: {detail}")
        self.stage = stage
        self.grpc_code = grpc_code
        self.http_status = HTTP_STATUS.get(grpc_code, 502)


# The one gRPC-to-HTTP table: every code a ragline error carries, and its HTTP twin.
HTTP_STATUS: dict[str, int] = {
    cls.grpc_code: cls.http_status
    for cls in (
        InvalidArgument,
        NotFound,
        PermissionDenied,
        AlreadyExists,
        FailedPrecondition,
        ResourceExhausted,
        DeadlineExceeded,
        Unavailable,
        Cancelled,
    )
}
