"""Domain errors. Each names the gRPC status it maps to, so the service layer stays a thin map."""

from __future__ import annotations

import errno
import sqlite3


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


class ModelLoadError(Exception):
    """The model could not be loaded; the message says what to do about it.

    Raised at start-up by either encoder (the local model, or a Ray app that cannot be found),
    never mapped to a status: the server logs it and exits 2.
    """


# SQLite result codes (sqlite3.Error.sqlite_errorname) of a data dir that cannot take a write.
_SQLITE_FULL = ("SQLITE_FULL",)
_SQLITE_UNWRITABLE = ("SQLITE_READONLY", "SQLITE_IOERR", "SQLITE_CANTOPEN", "SQLITE_PERM")


def storage_error(exc: BaseException) -> ClipSearchError | None:
    """A write's disk-full or unwritable-data-dir failure as a status a client can act on.

    None for anything else (a bug stays INTERNAL). Disk full is RESOURCE_EXHAUSTED; a
    read-only, failing or forbidden data dir is UNAVAILABLE. Either way nothing of the write
    was stored (the transaction rolled back) and reads go on working.
    """
    name = getattr(exc, "sqlite_errorname", "") if isinstance(exc, sqlite3.Error) else ""
    number = getattr(exc, "errno", None) if isinstance(exc, OSError) else None
    if name.startswith(_SQLITE_FULL) or number in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhausted(f"the data dir is full ({exc}); nothing of this write was "
                                 "stored: free some space and retry")
    if name.startswith(_SQLITE_UNWRITABLE) or number in (errno.EROFS, errno.EACCES,
                                                          errno.EPERM, errno.EIO):
        return Unavailable(f"the data dir cannot be written ({exc}); nothing of this write "
                           "was stored, reads still work")
    return None
