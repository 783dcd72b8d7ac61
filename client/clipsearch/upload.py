"""The client's upload pipeline: inputs sent in requests that stay under the message limit.

Requests are split to stay under half the message limit (`iter_batches`), lazily, so that only
one batch of loaded images is held at a time. An item too large to send at all is not sent: it
is reported as a per-item failure, like an item the server refused.

`upsert` keeps `pipeline` requests in flight, so that the server decodes one batch while its
model runs the previous one instead of idling between round trips; `embed` sends texts or
images one request at a time and gathers the vectors. Neither knows the Client: each is handed
the client's calls and its `Limits`.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from google.protobuf import struct_pb2
from tqdm import tqdm

from clipsearch.errors import (
    BatchError,
    ClipSearchError,
    ItemFailure,
    PartialWriteError,
    _item_failures,
    _malformed,
    _too_large,
)
from clipsearch.images import _load_image
from clipsearch.results import decode_matrix
from clipsearch.v1 import clipsearch_pb2 as pb

_T = TypeVar("_T")

# The client's call: an RPC method's name and its request in, the response out.
Call = Callable[[str, Any], Any]


@dataclass(frozen=True)
class Limits:
    """How the client splits its requests."""

    batch_size: int  # items per request at most
    batch_bytes: int  # about this many bytes per request
    item_limit: int  # an item larger than this is not sent


def iter_batches(
    items: Iterable[_T],
    size_of: Callable[[_T], int],
    *,
    max_items: int,
    max_bytes: int,
) -> Iterator[list[tuple[int, _T]]]:
    """Group items into batches of at most ``max_items`` and about ``max_bytes``.

    Lazy, so that only one batch of loaded images is held at a time. Yields lists of
    ``(index, item)`` with the item's position in ``items``. An item larger than ``max_bytes``
    goes alone in its batch rather than being dropped.
    """
    if max_items < 1:
        raise ValueError("max_items must be at least 1")
    batch: list[tuple[int, _T]] = []
    batch_bytes = 0
    for index, item in enumerate(items):
        size = size_of(item)
        if batch and (len(batch) >= max_items or batch_bytes + size > max_bytes):
            yield batch
            batch, batch_bytes = [], 0
        batch.append((index, item))
        batch_bytes += size
    if batch:
        yield batch


def _sendable(
    batch: list[tuple[int, _T]], size_of: Callable[[_T], int], limit: int,
    failures: list[ItemFailure],
) -> list[tuple[int, _T]]:
    """The items of a batch that are not over the item limit; the others join ``failures``."""
    sendable = []
    for index, item in batch:
        size = size_of(item)
        if size > limit:
            failures.append(_too_large(index, size, limit))
        else:
            sendable.append((index, item))
    return sendable


# --------------------------------------------------------------------------------------------
# Embedding


def embed(
    send: Callable[[list[Any]], Any],
    payloads: Iterable[bytes],
    *,
    decode: Callable[[bytes], Any],
    total: int,
    dim: Callable[[], int],
    limits: Limits,
    progress: bool,
) -> tuple[np.ndarray, list[ItemFailure]]:
    """The (total, dim) vectors of the payloads, NaN rows for those that failed, and the
    failures in index order.

    ``send`` calls the server with a batch of decoded payloads and returns its response.
    """
    rows: dict[int, np.ndarray] = {}
    failures: list[ItemFailure] = []
    width: int | None = None
    with tqdm(total=total, unit="item", disable=not progress) as bar:
        for batch in iter_batches(
            payloads, len, max_items=limits.batch_size, max_bytes=limits.batch_bytes
        ):
            sendable = _sendable(batch, len, limits.item_limit, failures)
            if sendable:
                response = send([decode(p) for _, p in sendable])
                matrix = decode_matrix(response.vectors)
                if matrix.shape[0] != len(sendable):
                    raise _malformed(f"{matrix.shape[0]} rows for {len(sendable)} items")
                width = matrix.shape[1]
                for row, (index, _) in enumerate(sendable):
                    rows[index] = matrix[row]
                failures.extend(_item_failures(response.errors, sendable))
            bar.update(len(batch))
    # The dimension comes from a response; with none (empty input, or every item refused
    # before sending) `dim` is asked, so the shape is always (total, dim).
    out = np.full((total, width if width is not None else dim()), np.nan, dtype=np.float32)
    for index, row in rows.items():
        out[index] = row
    failures.sort(key=lambda f: f.index)
    for failure in failures:
        out[failure.index] = np.nan
    return out, failures


# --------------------------------------------------------------------------------------------
# Upserting


def upsert(
    call: Call,
    collection: str,
    ids: Sequence[str],
    content: tuple[str, Sequence[Any]],
    structs: Sequence[struct_pb2.Struct | None],
    *,
    limits: Limits,
    pipeline: int,
    progress: bool,
) -> int:
    """Writes checked items (see `Client.upsert`); returns the number written.

    ``content`` is an Item field and a value per id. Raises BatchError when items failed and
    PartialWriteError when a request failed (nothing more is sent after it).
    """
    n = len(ids)
    written = 0
    failures: list[ItemFailure] = []
    stored: set[int] = set()  # indexes whose request succeeded and item was not refused
    rpc_error: ClipSearchError | None = None
    in_flight: collections.deque[tuple[Future, list, int]] = collections.deque()

    def finish_oldest() -> None:
        nonlocal written, rpc_error
        future, sendable, count = in_flight.popleft()
        if sendable:
            try:
                response = future.result()
            except ClipSearchError as exc:
                rpc_error = rpc_error or exc  # send no more; the report comes at the end
            else:
                written += response.upserted
                refused = _item_failures(response.errors, sendable)
                failures.extend(refused)
                stored.update({i for i, _ in sendable} - {f.index for f in refused})
        bar.update(count)

    items = _items(ids, *content, structs)
    with tqdm(total=n, unit="item", disable=not progress) as bar, ThreadPoolExecutor(
        pipeline, thread_name_prefix="clipsearch-upload"
    ) as pool:
        for batch in iter_batches(
            items, pb.Item.ByteSize, max_items=limits.batch_size, max_bytes=limits.batch_bytes
        ):
            if rpc_error is not None:
                break
            sendable = _sendable(batch, pb.Item.ByteSize, limits.item_limit, failures)
            future: Future = Future()
            if sendable:
                request = pb.UpsertItemsRequest(
                    collection=collection, items=[item for _, item in sendable]
                )
                future = pool.submit(call, "UpsertItems", request)
            in_flight.append((future, sendable, len(batch)))
            if len(in_flight) >= pipeline:
                finish_oldest()
        while in_flight:
            finish_oldest()
    failures.sort(key=lambda f: f.index)
    if rpc_error is not None or failures:
        written_ids = [id_ for i, id_ in enumerate(ids) if i in stored]
        not_written_ids = [id_ for i, id_ in enumerate(ids) if i not in stored]
        if rpc_error is not None:
            raise PartialWriteError(rpc_error, written_ids, not_written_ids, failures)
        raise BatchError(failures, n, upserted=written, written_ids=written_ids,
                         not_written_ids=not_written_ids)
    return written


def _items(
    ids: Sequence[str],
    field: str,
    values: Sequence[Any],
    structs: Sequence[struct_pb2.Struct | None],
) -> Iterator[pb.Item]:
    """The items, each built when its batch is assembled: an image file is read only then."""
    for id_, value, struct in zip(ids, values, structs, strict=True):
        item = pb.Item(id=id_)
        if field == "image":
            item.image = _load_image(value)
        elif field == "vector":
            item.vector.CopyFrom(value)
        else:
            setattr(item, field, value)
        if struct is not None:
            item.metadata.CopyFrom(struct)
        yield item
