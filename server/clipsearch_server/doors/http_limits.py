"""Slow and idle clients at both doors: read timeouts and connection limits.

Each open connection holds a file descriptor from the budget the collections use
(datadir.raise_descriptor_limit reserves the two connection limits out of it), so a client
must not keep one for free: a request head trickled a byte at a time, a body that never
finishes, a TCP or TLS handshake left half done, or just many connections.

The HTTP door runs uvicorn, which closes idle keep-alive connections (`timeout_keep_alive`)
but has no read timeout and counts connections only once a request arrives
(`limit_concurrency` answers that request 503). `guarded_protocol` subclasses uvicorn's
httptools protocol (forced: the C parser is the fast one, and its callbacks mark where a head
and a body begin and end) with one timer per connection:
- head: the whole request head must arrive within `header_timeout_s` of the connection opening
  or of the previous response (or of the previous request's body, whichever ends later),
  however the bytes trickle in;
- body: the body must arrive within `body_timeout_s` of the end of its head; time during
  which the server itself stopped reading (flow control, a pipelined request waiting its turn,
  a client waiting for our "100 Continue") does not count;
- connections beyond `max_connections` are answered 503 and closed as they are accepted,
  before any request, so they never hold a descriptor for longer than one write.
A request that times out part-way gets `408 Request Timeout` (when no response has begun) and
its connection is closed; the application sees `http.disconnect`. With TLS, the protocol (and
so the limit and the timers) starts once the handshake is done; until then asyncio's own
handshake timeout (60 s) bounds a connection.

The gRPC door runs gRPC core, which has these controls as channel arguments:
`grpc_connection_options` turns the settings into them.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..settings import AnySettings

log = logging.getLogger(__name__)


def _plain_response(status: str, text: str, *extra: bytes) -> bytes:
    body = text.encode()
    return b"".join([f"HTTP/1.1 {status}\r\n".encode(),
                     b"content-type: text/plain; charset=utf-8\r\n",
                     b"content-length: %d\r\n" % len(body), *extra,
                     b"x-content-type-options: nosniff\r\n", b"connection: close\r\n\r\n",
                     body])


TOO_MANY_CONNECTIONS = _plain_response("503 Service Unavailable", "too many connections",
                                       b"retry-after: 1\r\n")
REQUEST_TIMEOUT = _plain_response("408 Request Timeout", "request timeout")
LOG_EVERY_S = 10.0  # a flood of refusals or timeouts logs one line per this many seconds
_POLL_S = 1.0  # how often a body timer looks whether an awaited "100 Continue" has gone out


@dataclass(frozen=True)
class HttpLimits:
    """How long a request's head and body may take to arrive; connections held at once."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    max_connections: int = 512  # 0 = no limit

    @classmethod
    def from_settings(cls, settings: AnySettings) -> HttpLimits:
        return cls(header_timeout_s=settings.http_header_timeout_s,
                   body_timeout_s=settings.http_body_timeout_s,
                   max_connections=settings.http_max_connections)


class _Tally:
    """Counts what the guard did and logs it at most once per LOG_EVERY_S, so that a slow-client
    attack cannot turn into a flood of log lines."""

    def __init__(self, limits: HttpLimits) -> None:
        self.limits = limits
        self.counts: Counter[str] = Counter()
        self.logged_at = -math.inf

    def note(self, what: str, now: float) -> None:
        self.counts[what] += 1
        if now - self.logged_at < LOG_EVERY_S:
            return
        self.logged_at = now
        described = {
            "refused": f"connections refused over --http-max-connections "
                       f"{self.limits.max_connections}",
            "head": f"connections closed for a request head slower than "
                    f"--http-header-timeout-s {self.limits.header_timeout_s:g}",
            "body": f"connections closed for a request body slower than "
                    f"--http-body-timeout-s {self.limits.body_timeout_s:g}"}
        log.warning("HTTP door: %s", "; ".join(f"{n} {described[what]}"
                                               for what, n in sorted(self.counts.items())))
        self.counts.clear()


class _TimedFlow(FlowControl):
    """uvicorn's read/write flow control, also counting how long reading has been paused."""

    def __init__(self, transport: asyncio.Transport, clock: Callable[[], float]) -> None:
        super().__init__(transport)
        self._clock = clock
        self._paused_total = 0.0
        self._paused_since: float | None = None

    def pause_reading(self) -> None:
        if not self.read_paused:
            self._paused_since = self._clock()
        super().pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused and self._paused_since is not None:
            self._paused_total += self._clock() - self._paused_since
            self._paused_since = None
        super().resume_reading()

    def paused_s(self) -> float:
        """Seconds reading has been paused so far, the current pause included."""
        if self._paused_since is None:
            return self._paused_total
        return self._paused_total + self._clock() - self._paused_since


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the head and body timeouts and the connection limit.

    One timer per connection, for the head or for the body (never both: a head ends before its
    body starts). No timer runs while the application works on a request whose body has
    arrived; uvicorn's keep-alive timer still closes a connection idle after a response.
    """

    limits: ClassVar[HttpLimits] = HttpLimits()
    tally: ClassVar[_Tally] = _Tally(limits)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None
        self._waiting_for: str | None = None  # "head" or "body": what the timer bounds
        self._awaiting_head = True  # the next thing the client owes us is a request head
        self._head_begun = False  # some of that head has arrived
        self._body_since = 0.0  # when the body's clock started ...
        self._body_paused = 0.0  # ... and how long reading had been paused by then
        self._refused = False

    # Connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        limit = self.limits.max_connections
        if limit and len(self.connections) >= limit:
            # Refused before uvicorn counts it: the descriptor goes back as the write is sent.
            self._refused = True
            self.transport = transport
            self.tally.note("refused", self.loop.time())
            transport.write(TOO_MANY_CONNECTIONS)
            transport.close()
            return
        super().connection_made(transport)
        self.flow = _TimedFlow(transport, self.loop.time)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        if not self._refused:
            super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._refused:
            super().data_received(data)

    # httptools parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_begun = True

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._awaiting_head = self._head_begun = False
        self._body_since = self.loop.time()
        self._body_paused = self._timed_flow.paused_s()
        # With "Expect: 100-continue" the clock waits for our answer: _expired checks each second.
        self._start_timer("body", min(_POLL_S, self.limits.body_timeout_s)
                          if self.expect_100_continue else self.limits.body_timeout_s)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._awaiting_head = True
        if self._waiting_for == "body":
            self._cancel_timer()
        self._arm_head_timer()  # when the response went out before the body was all in

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_timer()

    # Timers

    @property
    def _timed_flow(self) -> _TimedFlow:
        return self.flow  # type: ignore[return-value]

    def _arm_head_timer(self) -> None:
        """The next head's clock starts once the client owes us one and nothing is in flight."""
        if (self._awaiting_head and self._timer is None and not self.pipeline
                and (self.cycle is None or self.cycle.response_complete)
                and not self.transport.is_closing()):
            self._start_timer("head", self.limits.header_timeout_s)

    def _start_timer(self, what: str, delay: float) -> None:
        self._cancel_timer()
        self._waiting_for = what
        self._timer = self.loop.call_later(delay, self._expired)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._waiting_for = None

    def _expired(self) -> None:
        what = self._waiting_for
        self._timer = None
        cycle = self.cycle if what == "body" else None
        if cycle is not None:
            if cycle.waiting_for_100_continue:
                # The client waits for our "100 Continue", which goes out when the application
                # first reads: its clock starts then (to within _POLL_S).
                self._body_since = self.loop.time()
                self._body_paused = self._timed_flow.paused_s()
                self._timer = self.loop.call_later(min(_POLL_S, self.limits.body_timeout_s),
                                                   self._expired)
                return
            # Time the server itself was not reading does not count against the client.
            used = (self.loop.time() - self._body_since
                    - (self._timed_flow.paused_s() - self._body_paused))
            if used < self.limits.body_timeout_s:
                self._timer = self.loop.call_later(self.limits.body_timeout_s - used,
                                                   self._expired)
                return
        self._waiting_for = None
        if self.transport.is_closing():
            return
        self.tally.note(what or "head", self.loop.time())
        if what == "head":
            answer = self._head_begun
        else:
            answer = cycle is not None and not cycle.response_started and not self.pipeline
        if cycle is not None and not cycle.response_complete:
            # The application's receive() returns http.disconnect, its send() does nothing.
            cycle.disconnected = True
            cycle.message_event.set()
        if answer:
            self.transport.write(REQUEST_TIMEOUT)
        self.transport.close()


def guarded_protocol(limits: HttpLimits) -> type[GuardedHttpProtocol]:
    """The protocol class to give uvicorn.Config(http=...), bound to these limits."""

    class Guarded(GuardedHttpProtocol):
        pass

    Guarded.limits = limits
    Guarded.tally = _Tally(limits)
    return Guarded


INT_MAX = 2**31 - 1  # gRPC core's millisecond arguments are C ints


def grpc_connection_options(settings: AnySettings) -> list[tuple[str, int]]:
    """gRPC core channel arguments for the server's keepalive, connection ages and limits.

    Keepalive pings are sent on connections with calls and idle ones alike (permit without
    calls), so a vanished peer holding a stream is found within time + timeout; a connection
    without calls for max_connection_idle gets a GOAWAY and clients reconnect on their next
    call. Clients may ping as often as every --grpc-min-ping-interval-s even without calls;
    faster pings count as strikes and the third closes the connection (gRPC's defaults).
    """

    def ms(seconds: float) -> int:
        return min(INT_MAX, max(1, round(seconds * 1000)))

    s = settings
    options = [
        ("grpc.keepalive_time_ms", ms(s.grpc_keepalive_time_s)),
        ("grpc.keepalive_timeout_ms", ms(s.grpc_keepalive_timeout_s)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", ms(s.grpc_min_ping_interval_s)),
        ("grpc.server_handshake_timeout_ms", ms(s.grpc_handshake_timeout_s)),
    ]
    if s.grpc_max_connection_idle_s:
        options.append(("grpc.max_connection_idle_ms", ms(s.grpc_max_connection_idle_s)))
    if s.grpc_max_connection_age_s:
        options += [("grpc.max_connection_age_ms", ms(s.grpc_max_connection_age_s)),
                    ("grpc.max_connection_age_grace_ms", ms(s.grpc_max_connection_age_grace_s))]
    if s.grpc_max_connections:
        options.append(("grpc.max_allowed_incoming_connections", s.grpc_max_connections))
    return options
