"""Replies are bounded before they are built: their bytes are counted as entries are added.

An attack pass asked GetItems for one id 4,096 times with thumbnails: the HTTP door (which had
no reply cap) sent 162 MiB, and over gRPC the whole reply was built before the send limit
refused it (+2.2 GB of RSS for 500 copies of a 1.2 MB thumbnail). So every reply that carries
stored items (thumbnails, vectors, metadata) counts each entry's encoded size as it is added,
and thumbnails are read from the store a few at a time. Past `--max-message-bytes` the call is
refused with RESOURCE_EXHAUSTED naming the limit, or, for a listing, the page ends early and
its page token continues from there. Both doors share this: it runs in the servicer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from google.protobuf.message import Message

from .errors import ResourceExhausted

T = TypeVar("T")
# Room for the reply's own fields (counts, tokens) and gRPC's framing.
RESERVED_BYTES = 16 * 1024
ENTRY_OVERHEAD = 6  # a repeated field's tag and length prefix, at most, below 256 MiB
THUMBNAIL_CHUNK = 32  # thumbnails read from the store at a time (up to ~40 MB at 1024 px)


class ReplyBudget:
    """The bytes a reply may still take."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = RESERVED_BYTES

    def fits(self, entry: Message) -> bool:
        """Count `entry` when it fits; False (nothing counted) when it would not."""
        size = entry.ByteSize() + ENTRY_OVERHEAD
        if self.used + size > self.limit:
            return False
        self.used += size
        return True

    def refusal(self, entries: int, what: str) -> ResourceExhausted:
        return ResourceExhausted(
            f"the reply would be larger than the server's limit of {self.limit} bytes "
            f"(--max-message-bytes) after {entries} {what}; ask for fewer, or leave out "
            "thumbnails or vectors")

    def add(self, entry: Message, entries: int, what: str) -> None:
        """Count `entry` or refuse the call (`entries` already in the reply, for the message)."""
        if not self.fits(entry):
            raise self.refusal(entries, what)


async def with_thumbnails(rows: Sequence[T], id_of: Callable[[T], str],
                          thumbnails: Callable[[list[str]], dict[str, bytes]] | None,
                          make: Callable[[T, bytes | None], Message], budget: ReplyBudget,
                          what: str, partial: bool = False) -> list[Any]:
    """The reply entries of `rows` (make(row, thumbnail)), counted against the budget.

    `thumbnails` (a store's blocking read, or None when the request wants none) runs in a
    thread a chunk of ids at a time. Past the budget: the entries so far when `partial` (a
    listing's page) and there are some, else RESOURCE_EXHAUSTED.
    """
    entries: list[Any] = []
    chunk = THUMBNAIL_CHUNK if thumbnails is not None else max(1, len(rows))
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        found = (await asyncio.to_thread(thumbnails, [id_of(r) for r in part])
                 if thumbnails is not None else {})
        for row in part:
            entry = make(row, found.get(id_of(row)))
            if not budget.fits(entry):
                if partial and entries:
                    return entries
                raise budget.refusal(len(entries), what)
            entries.append(entry)
    return entries
