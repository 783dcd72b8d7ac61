"""Domain errors. Each names the gRPC status it maps to, so the service layer stays a thin map."""

from __future__ import annotations


class ClipSearchError(Exception):
    """Base of every error the service turns into a gRPC status.

    `field` names the request field at fault (e.g. "k", "items[3].id"); the service sends it
    as a google.rpc.BadRequest field violation so clients can point at it.
    """

    code_name = "INTERNAL"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class InvalidArgument(ClipSearchError):
    code_name = "INVALID_ARGUMENT"


class NotFound(ClipSearchError):
    code_name = "NOT_FOUND"


class AlreadyExists(ClipSearchError):
    code_name = "ALREADY_EXISTS"


class FailedPrecondition(ClipSearchError):
    code_name = "FAILED_PRECONDITION"


class ResourceExhausted(ClipSearchError):
    code_name = "RESOURCE_EXHAUSTED"


class Unavailable(ClipSearchError):
    code_name = "UNAVAILABLE"


class DeadlineExceeded(ClipSearchError):
    code_name = "DEADLINE_EXCEEDED"
