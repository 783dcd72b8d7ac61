"""The client's errors: a failed call, a batch with failed items, a split write cut short."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from clipsearch.v1 import clipsearch_pb2 as pb

_CODES_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


class ClipSearchError(Exception):
    """A call failed; ``code`` is the gRPC status code and ``details`` the server's message.

    ``field_violations`` lists (field, description) pairs when the server named the request
    fields at fault (google.rpc.BadRequest details), e.g. ``[("k", "k must be 1..1000")]``.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        field_violations: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.field_violations = list(field_violations)


@dataclass(frozen=True)
class ItemFailure:
    """One item of a batch that failed; ``index`` is its position in the caller's list."""

    index: int
    code: grpc.StatusCode
    message: str


class BatchError(ClipSearchError):
    """Some items of a batch call failed while the others succeeded.

    ``errors`` lists the failed items (indexes into the caller's list). For embed calls,
    ``vectors`` holds the whole result with NaN rows for the failed items, so a caller can
    catch this and keep the good rows. For upsert, the good items were written and
    ``upserted`` says how many.
    """

    def __init__(
        self,
        errors: list[ItemFailure],
        total: int,
        *,
        vectors: np.ndarray | None = None,
        upserted: int | None = None,
        written_ids: list[str] | None = None,
        not_written_ids: list[str] | None = None,
    ) -> None:
        codes = {e.code for e in errors}
        code = codes.pop() if len(codes) == 1 else grpc.StatusCode.UNKNOWN
        first = errors[0]
        details = (
            f"{len(errors)} of {total} items failed; first: item {first.index}: "
            f"{first.code.name}: {first.message}"
        )
        super().__init__(code, details)
        self.errors = errors
        self.vectors = vectors
        self.upserted = upserted
        self.written_ids = written_ids  # upsert: the ids stored, and those that were not
        self.not_written_ids = not_written_ids


class PartialWriteError(ClipSearchError):
    """A request of a write the client split into several failed; others may have succeeded.

    ``code`` and ``details`` are the failed request's. ``written_ids`` were stored (their
    requests succeeded); ``not_written_ids`` were not confirmed: refused, never sent after
    the failure, or in a request that failed. A request that failed with DEADLINE_EXCEEDED or
    UNAVAILABLE may still have been stored; upsert is idempotent, so resending
    ``not_written_ids`` is safe. ``errors`` lists per-item failures of the requests that
    succeeded.
    """

    def __init__(
        self,
        cause: ClipSearchError,
        written_ids: list[str],
        not_written_ids: list[str],
        errors: list[ItemFailure],
    ) -> None:
        super().__init__(
            cause.code,
            f"{cause.details} ({len(written_ids)} items written, {len(not_written_ids)} not)",
            cause.field_violations,
        )
        self.written_ids = written_ids
        self.not_written_ids = not_written_ids
        self.upserted = len(written_ids)
        self.errors = errors


def _status_code(number: int) -> grpc.StatusCode:
    return _CODES_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


def _malformed(what: str) -> ClipSearchError:
    return ClipSearchError(grpc.StatusCode.INTERNAL, f"malformed response: {what}")


def _field_violations(exc: grpc.RpcError) -> list[tuple[str, str]]:
    """The google.rpc.BadRequest field violations a failed call carries, if any."""
    if not isinstance(exc, grpc.Call):
        return []
    try:
        status = rpc_status.from_call(exc)
    except ValueError:  # details inconsistent with the call's status
        return []
    violations: list[tuple[str, str]] = []
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend((v.field, v.description) for v in bad.field_violations)
    return violations


def _too_large(index: int, size: int, limit: int) -> ItemFailure:
    return ItemFailure(
        index, grpc.StatusCode.RESOURCE_EXHAUSTED, f"item is {size} bytes, over the {limit} limit"
    )


def _item_failures(
    errors: Iterable[pb.ItemError], sent: Sequence[tuple[int, Any]]
) -> list[ItemFailure]:
    """Maps per-item errors from request positions back to the caller's indexes."""
    failures = []
    for error in errors:
        if error.index >= len(sent):
            raise _malformed(f"error for item {error.index} of a batch of {len(sent)}")
        failures.append(ItemFailure(sent[error.index][0], _status_code(error.code), error.message))
    return failures
