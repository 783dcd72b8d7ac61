"""The gRPC wire's edge, shared by every RPC: status mapping, deadlines, codecs and checks.

The servicer (`service.py`) and its analysis mixin (`analysis_rpcs.py`) both speak the same
wire: a domain error becomes the same status, a vector or an id is checked the same way and
a limit is refused with the same message wherever it appears. Keeping these here means the
two RPC modules import this one and not each other.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import numpy as np
from google.protobuf import any_pb2, json_format, struct_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from clipsearch.v1 import clipsearch_pb2 as pb

from .errors import ClipSearchError, InvalidArgument

if TYPE_CHECKING:
    from .stores.base import CollectionStore

log = logging.getLogger(__name__)

MAX_ID_CHARS = 512
MAX_METADATA_BYTES = 64 * 1024
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000

Resp = TypeVar("Resp")


# --- status ----------------------------------------------------------------------------------
def grpc_errors(method: Callable[..., Awaitable[Resp]]) -> Callable[..., Awaitable[Resp]]:
    """Turn domain errors into their status codes and anything unexpected into INTERNAL."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Resp:
        try:
            return await method(self, request, context)
        except ClipSearchError as exc:
            code = grpc.StatusCode[exc.code_name]
            if exc.field is None:
                await context.abort(code, str(exc))
            status = status_with_field(code, str(exc), exc.field)
            await context.abort(status.code, status.details, status.trailing_metadata)
        except asyncio.CancelledError:
            raise
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("%s failed", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")
        raise AssertionError("unreachable")

    return wrapper


def status_with_field(code: grpc.StatusCode, message: str, field: str) -> grpc.Status:
    """A status carrying a google.rpc.BadRequest that names the offending field."""
    violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=message)
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    return rpc_status.to_status(
        status_pb2.Status(code=code.value[0], message=message, details=[detail]))


def item_errors(errors: dict[int, ClipSearchError]) -> list[pb.ItemError]:
    """Per-item failures by request position, for replies that go on past a bad item."""
    return [pb.ItemError(index=i, code=grpc.StatusCode[e.code_name].value[0], message=str(e))
            for i, e in sorted(errors.items())]


def deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline on the time.monotonic() clock, if the client set one."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


# --- limits ----------------------------------------------------------------------------------
def in_range(value: int, low: int, high: int, field: str) -> int:
    """`value`, or InvalidArgument naming `field` when it is outside low..high."""
    if not low <= value <= high:
        raise InvalidArgument(f"{field} must be {low}..{high}, not {value}", field)
    return value


def at_most(value: int, limit: int, field: str) -> int:
    """`value` (0 asks for the default), or InvalidArgument naming `field` above `limit`."""
    if value > limit:
        raise InvalidArgument(f"{field} must be 0 (default) to {limit}, not {value}", field)
    return value


def check_k(k: int, max_k: int) -> int:
    """The number of hits asked for: Search and Recommend share the server's --max-k."""
    return in_range(k, 1, max_k, "k")


def check_ef(ef: int, max_ef: int) -> int:
    """The graph's search breadth (0: the server's default), bounded by --max-ef."""
    return at_most(ef, max_ef, "ef")


def page_size(requested: int) -> int:
    """A page's length: DEFAULT_PAGE_SIZE for 0, refused above MAX_PAGE_SIZE."""
    return at_most(requested, MAX_PAGE_SIZE, "page_size") or DEFAULT_PAGE_SIZE


# --- page tokens -----------------------------------------------------------------------------
# Opaque to clients, but plain base64: a token never carries anything the caller may not see.
def encode_page_token(last_id: str) -> str:
    """A token for the page after the item `last_id` (ids are ordered, so pages stay stable)."""
    return base64.urlsafe_b64encode(last_id.encode()).decode()


def decode_page_token(token: str) -> str:
    """The last id of the previous page, or InvalidArgument for a token not made here."""
    try:
        last_id = base64.b64decode(token.encode(), altchars=b"-_", validate=True).decode()
        check_id(last_id)
        return last_id
    except (ValueError, UnicodeError, InvalidArgument):
        raise _foreign_token() from None


def encode_offset_token(offset: int) -> str:
    """A token for the results from position `offset` of a cached, ordered result."""
    return base64.urlsafe_b64encode(f"dup:{offset}".encode()).decode()


def decode_offset_token(token: str) -> int:
    """The position a token from encode_offset_token continues at."""
    try:
        text = base64.b64decode(token.encode(), altchars=b"-_", validate=True).decode()
        kind, _, number = text.partition(":")
        offset = int(number)
        if kind != "dup" or offset < 0 or not math.isfinite(offset):
            raise ValueError(text)
        return offset
    except (ValueError, UnicodeError):
        raise _foreign_token() from None


def _foreign_token() -> InvalidArgument:
    return InvalidArgument("page_token is not one this server handed out", "page_token")


# --- requests --------------------------------------------------------------------------------
def check_id(id_: str) -> None:
    """Item ids are keys in every store and travel in page tokens: bounded and NUL-free."""
    if not id_:
        raise InvalidArgument("item id is empty")
    if len(id_) > MAX_ID_CHARS:
        raise InvalidArgument(f"item id is {len(id_)} characters, over the limit of {MAX_ID_CHARS}")
    if "\x00" in id_:
        raise InvalidArgument("item id contains a NUL character")


def metadata_dict(metadata: struct_pb2.Struct) -> dict:
    """An item's metadata as plain JSON values, refused when NaN or over MAX_METADATA_BYTES."""
    try:
        value = json_format.MessageToDict(metadata)
        size = len(json.dumps(value, separators=(",", ":"), allow_nan=False))
    except ValueError:
        raise InvalidArgument("metadata has a NaN or infinite number") from None
    if size > MAX_METADATA_BYTES:
        raise InvalidArgument(
            f"metadata is {size} bytes as JSON, over the limit of {MAX_METADATA_BYTES}")
    return value


def unit_vector(vector: pb.Vector, dim: int, field: str) -> np.ndarray:
    """Decode a wire vector, check it, and scale it to unit length (the index is cosine)."""
    if vector.dim != dim:
        raise InvalidArgument(f"vector dim is {vector.dim}, the collection's is {dim}", field)
    if len(vector.data) != 4 * dim:
        raise InvalidArgument(
            f"vector data is {len(vector.data)} bytes; dim {dim} needs {4 * dim} "
            "(little-endian float32)", field)
    values = np.frombuffer(vector.data, dtype="<f4").astype(np.float32)
    if not np.all(np.isfinite(values)):
        raise InvalidArgument("vector has NaN or infinite values", field)
    norm = float(np.linalg.norm(values))
    if norm == 0.0 or not math.isfinite(norm):
        raise InvalidArgument("vector has zero length", field)
    return values / norm


def where(request: Any, collection: CollectionStore) -> Any:
    """The request's filter (or None) in the collection store's own terms."""
    try:
        return collection.compile_filter(request.filter if request.HasField("filter") else None)
    except InvalidArgument as exc:
        exc.field = exc.field or "filter"
        raise


# --- replies ---------------------------------------------------------------------------------
def struct(value: dict) -> struct_pb2.Struct:
    """Stored metadata as the wire's Struct."""
    message = struct_pb2.Struct()
    message.update(value)
    return message


def vector(values: np.ndarray) -> pb.Vector:
    """One vector as little-endian float32 bytes, the wire's layout on every platform."""
    return pb.Vector(data=np.ascontiguousarray(values, dtype="<f4").tobytes(), dim=len(values))


def matrix(values: np.ndarray) -> pb.Matrix:
    """Rows of vectors as one little-endian float32 block: one copy, not one message a row."""
    rows, dim = values.shape
    return pb.Matrix(data=np.ascontiguousarray(values, dtype="<f4").tobytes(), rows=rows, dim=dim)
