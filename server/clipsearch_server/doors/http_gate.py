"""What the HTTP door checks from a request's head, before it reads a byte of the body.

An attack pass found that a 48 MiB JSON body sent without any token was read and parsed on
the event loop before the token was checked (47.7 s, during which the page and searches on
both doors stalled). So, from the head alone:

* **Host and Origin** (only with authentication off): a web page on another site can reach a
  server on 127.0.0.1 through DNS rebinding, where its own name resolves to our address. The
  door therefore answers only `Host` values that name the address it is bound to, localhost,
  an IP address (when bound to every interface), or `--allowed-hosts`; and a browser's call
  (it sends `Origin`) must come from the same origin or an allowed host. Others get 403.
* **The token and the method's scope**: the same TokenTable that the gRPC interceptor asks.
  Collection globs need the body; the interceptor checks those after parsing.
* **The declared size**: JSON bodies have a cap of their own (`--max-json-bytes`), well below
  the binary one, because parsing JSON into messages costs about a second per 10 MiB of
  short strings. A body without a Content-Length is counted as it arrives.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import grpc
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from .auth import Refused, TokenTable

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

WILDCARD_HOSTS = ("0.0.0.0", "::", "")
# Content types of the Connect, gRPC-Web and JSON protocols.
_API_TYPE = re.compile(r"^application/(json|proto|connect\+|grpc-web)")
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
# HTTP statuses of the Connect codes (connectrpc's own table, for answers we send ourselves).
HTTP_STATUS = {"invalid_argument": 400, "unauthenticated": 401, "permission_denied": 403,
               "not_found": 404, "resource_exhausted": 429, "unavailable": 503,
               "deadline_exceeded": 504, "failed_precondition": 400, "canceled": 499}


@dataclass(frozen=True)
class HeadRefusal:
    """An API call refused on its head: its status, message and HTTP status."""

    code: grpc.StatusCode
    message: str
    http_status: int | None = None  # None: the HTTP status of the code


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _split_host(value: str) -> tuple[str, str]:
    """`name[:port]` or `[v6][:port]` -> (lowercase name without brackets, port or "")."""
    value = value.strip().lower()
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        return name, rest.removeprefix(":")
    if value.count(":") == 1:
        name, _, port = value.partition(":")
        return name, port
    return value, ""


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HostCheck:
    """Which `Host` and `Origin` values the door answers while authentication is off."""

    def __init__(self, bound_host: str, allowed_hosts: tuple[str, ...]) -> None:
        self._any_ip = bound_host in WILDCARD_HOSTS
        names = {*LOCAL_NAMES, *(h.lower() for h in allowed_hosts)}
        if not self._any_ip:
            names.add(_split_host(bound_host)[0])
        self._names = frozenset(names)
        self._everything = "*" in self._names

    def _name_allowed(self, name: str) -> bool:
        return self._everything or name in self._names or (self._any_ip and _is_ip(name))

    def refusal(self, scope: Scope) -> str | None:
        """Why this request is refused (a sentence), or None when it may go on."""
        host = _header(scope, b"host")
        if host is None:
            return "the request has no Host header"
        name, port = _split_host(host)
        if not self._name_allowed(name):
            return (f"Host {host!r} is not an address of this server; add it to "
                    "--allowed-hosts to serve it")
        origin = _header(scope, b"origin")
        if origin is None:
            return None  # not a browser's cross-site call (browsers always send Origin)
        parts = urlsplit(origin)
        origin_name = (parts.hostname or "").lower()
        default = "443" if parts.scheme == "https" else "80"
        same = origin_name == name and str(parts.port or default) == (port or default)
        if same or (origin_name and origin_name in self._names) or self._everything:
            return None
        return (f"Origin {origin!r} is not this server's; add its host to --allowed-hosts to "
                "let its pages call the API")


class RpcHeadCheck:
    """The checks an API call passes on its head alone: token, scope and declared size."""

    def __init__(self, tokens: TokenTable, max_json_bytes: int, max_binary_bytes: int) -> None:
        self._tokens = tokens
        self.max_json_bytes = max_json_bytes
        self.max_binary_bytes = max_binary_bytes

    def cap(self, scope: Scope) -> int:
        """The body cap for this request's content type."""
        kind = (_header(scope, b"content-type") or "").lower()
        return self.max_json_bytes if "json" in kind else self.max_binary_bytes

    def refusal(self, scope: Scope) -> HeadRefusal | None:
        """Why a call is refused on its head, or None."""
        if self._tokens:
            try:
                self._tokens.authorize(scope["path"], _header(scope, b"authorization") or "")
            except Refused as refused:
                return HeadRefusal(refused.code, refused.message)
        kind = (_header(scope, b"content-type") or "").lower()
        if scope["method"] == "POST" and not _API_TYPE.search(kind):
            # connectrpc answers 415 with an empty body: say what to send instead
            return HeadRefusal(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Content-Type {kind or '(none)'!r} is not an API type: send "
                "'Content-Type: application/json' (or application/proto for binary protobuf)",
                http_status=415)
        declared = _header(scope, b"content-length")
        cap = self.cap(scope)
        if declared is not None and declared.strip().isdigit() and int(declared) > cap:
            return HeadRefusal(grpc.StatusCode.RESOURCE_EXHAUSTED, _too_large(int(declared), cap))
        return None

    def counted(self, receive: Receive, cap: int, on_body_done: Callable[[], None]) -> Receive:
        """`receive`, refusing (RESOURCE_EXHAUSTED) once more than `cap` body bytes have
        arrived, and calling `on_body_done` after the body's last part."""
        seen = 0

        async def counting() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > cap:
                raise ConnectError(Code.RESOURCE_EXHAUSTED, _too_large(seen, cap))
            if message["type"] == "http.request" and not message.get("more_body", False):
                on_body_done()
            return message

        return counting


def _too_large(size: int, cap: int) -> str:
    return (f"request body of {size} bytes is over this door's limit of {cap} bytes for its "
            "content type (--max-json-bytes for JSON, --max-message-bytes for binary)")


async def send_connect_error(send: Send, code: grpc.StatusCode, message: str,
                             http_status: int | None = None) -> None:
    """A Connect protocol error (JSON body, HTTP status of the code), sent ourselves; the
    connection is closed after it, since the body it may still be sending is not read."""
    name = "canceled" if code is grpc.StatusCode.CANCELLED else code.name.lower()
    body = json.dumps({"code": name, "message": message}).encode()
    await send({"type": "http.response.start",
                "status": http_status or HTTP_STATUS.get(name, 500),
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


async def send_text(send: Send, status: int, text: str) -> None:
    """A plain-text answer (the page's and the thumbnail endpoint's errors)."""
    body = text.encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode()),
                            (b"x-content-type-options", b"nosniff")]})
    await send({"type": "http.response.body", "body": body})
