"""Bearer-token authentication with scopes, and TLS credentials.

Tokens come from a file and/or CLIPSEARCH_AUTH_TOKENS (comma-separated entries). A line of the
file (or an entry) reads `TOKEN [SCOPE [PATTERN...]]`; `#` starts a comment:

* SCOPE is `read` (embed, search, get, list, count, info, the analysis calls), `write` (also
  upsert, delete, create collection, and Cluster when it writes labels) or `admin` (also
  drop). A bare token is `admin`.
* PATTERNs are shell-style globs (fnmatch) limiting the token to those collection names;
  without any, the token reaches every collection. Collection listings show only the names a
  token may reach.

Every call must carry `authorization: Bearer <token>`, except the health and reflection
services, which stay open so that orchestrators and tools can probe the server. A valid token
beyond its scope or collections gets PERMISSION_DENIED naming what it would need.
"""

from __future__ import annotations

import fnmatch
import hmac
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from ..errors import InvalidArgument

log = logging.getLogger(__name__)

OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                 "/grpc.reflection.v1.ServerReflection/")
SERVICE_PREFIX = "/clipsearch.v1.ClipSearchService/"

READ, WRITE, ADMIN = "read", "write", "admin"
SCOPES = (READ, WRITE, ADMIN)  # each includes the ones before it

# The one table of which scope each ClipSearchService method needs. A method missing here
# needs `admin`, so a new RPC is closed until someone decides its scope.
METHOD_SCOPES: dict[str, str] = {
    "EmbedTexts": READ,
    "EmbedImages": READ,
    "ListCollections": READ,
    "GetCollection": READ,
    "GetItems": READ,
    "CountItems": READ,
    "ListItems": READ,
    "Search": READ,
    "GetServerInfo": READ,
    "Recommend": READ,
    "Classify": READ,
    "FindDuplicates": READ,
    "CreateCollection": WRITE,
    "UpsertItems": WRITE,
    "DeleteItems": WRITE,
    "Cluster": READ,  # WRITE when it writes labels (`metadata_key`): see request_scope
    "DropCollection": ADMIN,
}


@dataclass(frozen=True)
class TokenGrant:
    """What one token may do: a scope, on collections matching any pattern (none = all)."""

    token: str
    scope: str = ADMIN
    patterns: tuple[str, ...] = ()

    def allows_scope(self, needed: str) -> bool:
        return SCOPES.index(self.scope) >= SCOPES.index(needed)

    def allows_collection(self, name: str) -> bool:
        return not self.patterns or any(fnmatch.fnmatchcase(name, p) for p in self.patterns)


def required_scope(method: str) -> str:
    """The scope a full method name (/package.Service/Method) needs, whatever its request."""
    return METHOD_SCOPES.get(method.rsplit("/", 1)[-1], ADMIN)


def request_scope(method: str, request: Any) -> str:
    """The scope this request needs: a Cluster that writes labels is a write."""
    if method.endswith("/Cluster") and getattr(request, "metadata_key", ""):
        return WRITE
    return required_scope(method)


class Refused(Exception):
    """A call refused by its token: the status code and the message to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class TokenTable:
    """The accepted tokens; answers which grant a call's `authorization` value carries.

    Both doors ask it before anything else: the gRPC interceptor, and the HTTP door before it
    reads a request's body.
    """

    def __init__(self, grants: list[TokenGrant]) -> None:
        self._grants = [(g.token.encode(), g) for g in grants]

    def __len__(self) -> int:
        return len(self._grants)

    def _grant(self, presented: str) -> TokenGrant | None:
        candidate = presented.encode()
        found = None
        # compare against every token, so timing does not tell which one nearly matched
        for token, grant in self._grants:
            if hmac.compare_digest(candidate, token):
                found = grant
        return found

    def authorize(self, method: str, authorization: str) -> TokenGrant:
        """The grant of a call to `method` (its scope checked); raises Refused otherwise."""
        scheme, _, token = authorization.partition(" ")
        if not authorization:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED,
                          "missing 'authorization: Bearer <token>' metadata")
        grant = self._grant(token.strip()) if scheme.lower() == "bearer" else None
        if grant is None:
            log.warning("refused a call to %s: invalid token", method)
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token")
        check_scope(grant, method, required_scope(method))
        return grant


def check_scope(grant: TokenGrant, method: str, needed: str) -> None:
    """Raises Refused (PERMISSION_DENIED) when the grant's scope is below `needed`."""
    if not grant.allows_scope(needed):
        raise Refused(grpc.StatusCode.PERMISSION_DENIED,
                      f"{method.rsplit('/', 1)[-1]} needs the '{needed}' scope; "
                      f"this token has '{grant.scope}'")


def parse_grant(entry: str) -> TokenGrant:
    """`TOKEN [SCOPE [PATTERN...]]` -> TokenGrant; InvalidArgument when malformed."""
    token, *rest = entry.split()
    if len(token) < 16:
        raise InvalidArgument("auth tokens must be at least 16 characters long")
    scope = rest[0].lower() if rest else ADMIN
    if scope not in SCOPES:
        raise InvalidArgument(f"auth token scope must be read, write or admin, not {rest[0]!r}")
    return TokenGrant(token, scope, tuple(rest[1:]))


def load_tokens(path: Path | None, from_env: str | None) -> list[TokenGrant]:
    """Every accepted token and its grant; an empty list means authentication is off."""
    entries: list[str] = []
    if path is not None:
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                entries.append(line)
    if from_env:
        entries.extend(t.strip() for t in from_env.split(",") if t.strip())
    return [parse_grant(entry) for entry in entries]


def _refuse(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    async def abort(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    return grpc.unary_unary_rpc_method_handler(abort)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED without a valid bearer token; PERMISSION_DENIED beyond its grant."""

    def __init__(self, tokens: TokenTable) -> None:
        self._tokens = tokens

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if details.method.startswith(OPEN_SERVICES):
            return await continuation(details)
        header = dict(details.invocation_metadata or ()).get("authorization", "")
        try:
            grant = self._tokens.authorize(details.method, header)
        except Refused as refused:
            return _refuse(refused.code, refused.message)
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        return _limited_to_grant(handler, grant, details.method)


def _limited_to_grant(handler: grpc.RpcMethodHandler, grant: TokenGrant, method: str
                      ) -> grpc.RpcMethodHandler:
    """The handler, refusing what the request asks beyond the grant (a scope that depends on
    the request, collections outside its globs) and hiding other collections from replies."""
    behavior = handler.unary_unary
    patterns = " ".join(grant.patterns)

    async def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
        needed = request_scope(method, request)
        try:
            check_scope(grant, method, needed)
        except Refused as refused:
            await context.abort(refused.code, refused.message)
        name = _collection_of(request)
        if name and not grant.allows_collection(name):
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"this token reaches collections matching {patterns}, not {name!r}; "
                f"the call needs the '{needed}' scope on {name!r}")
        response = await behavior(request, context)
        if grant.patterns:
            _hide_other_collections(response, grant)
        return response

    return grpc.unary_unary_rpc_method_handler(
        checked, request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer)


def _hide_other_collections(response: Any, grant: TokenGrant) -> None:
    """Listings (ListCollections, GetServerInfo's unavailable ones) keep what the token
    reaches."""
    for field in ("collections", "unavailable_collections"):
        if hasattr(response, field):
            entries = getattr(response, field)
            keep = [e for e in entries if grant.allows_collection(e.name)]
            del entries[:]
            entries.extend(keep)


def _collection_of(request: Any) -> str | None:
    """The collection a request names (`collection`, or `name` for the collection calls);
    empty when it names none (Classify of images alone)."""
    descriptor = getattr(request, "DESCRIPTOR", None)
    if descriptor is None:
        return None
    for field in ("collection", "name"):
        if field in descriptor.fields_by_name:
            return getattr(request, field)
    return None


def server_credentials(cert: Path, key: Path, client_ca: Path | None
                       ) -> grpc.ServerCredentials:
    """TLS with our certificate; mutual TLS (client certificates required) given a CA."""
    return grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())],
        root_certificates=client_ca.read_bytes() if client_ca else None,
        require_client_auth=client_ca is not None,
    )
