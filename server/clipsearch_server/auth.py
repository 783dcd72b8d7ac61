"""Bearer-token authentication and TLS credentials.

Tokens come from a file (one per line, `#` comments) and/or CLIPSEARCH_AUTH_TOKENS
(comma-separated). Every call must carry `authorization: Bearer <token>`, except the health
and reflection services, which stay open so that orchestrators and tools can probe the server.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from .errors import InvalidArgument

log = logging.getLogger(__name__)

OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                 "/grpc.reflection.v1.ServerReflection/")


def load_tokens(path: Path | None, from_env: str | None) -> list[str]:
    """Every accepted token; an empty list means authentication is off."""
    tokens: list[str] = []
    if path is not None:
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                tokens.append(line)
    if from_env:
        tokens.extend(t.strip() for t in from_env.split(",") if t.strip())
    for token in tokens:
        if len(token) < 16:
            raise InvalidArgument("auth tokens must be at least 16 characters long")
    return tokens


def _refuse(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    async def abort(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    return grpc.unary_unary_rpc_method_handler(abort)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without a valid bearer token with UNAUTHENTICATED."""

    def __init__(self, tokens: list[str]) -> None:
        self._tokens = [t.encode() for t in tokens]

    def _valid(self, presented: str) -> bool:
        candidate = presented.encode()
        # compare against every token, so timing does not tell which one nearly matched
        return sum(hmac.compare_digest(candidate, t) for t in self._tokens) > 0

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if details.method.startswith(OPEN_SERVICES):
            return await continuation(details)
        header = dict(details.invocation_metadata or ()).get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            return _refuse(grpc.StatusCode.UNAUTHENTICATED,
                           "missing 'authorization: Bearer <token>' metadata")
        if scheme.lower() != "bearer" or not self._valid(token.strip()):
            log.warning("refused a call to %s: invalid token", details.method)
            return _refuse(grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token")
        return await continuation(details)


def server_credentials(cert: Path, key: Path, client_ca: Path | None
                       ) -> grpc.ServerCredentials:
    """TLS with our certificate; mutual TLS (client certificates required) given a CA."""
    return grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())],
        root_certificates=client_ca.read_bytes() if client_ca else None,
        require_client_auth=client_ca is not None,
    )
