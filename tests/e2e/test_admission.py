"""Open endpoints have their own budget: Watch streams cannot starve authenticated calls."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clipsearch import Client
from conftest import ServerProcess

TOKEN = "s3cret-token-for-admission-tests-0123"
WATCHERS = 70
OPEN_STREAMS = 16


@pytest.fixture(scope="module")
def token_server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[ServerProcess]:
    proc = ServerProcess(tiny_checkpoint, tmp_path_factory.mktemp("admission") / "data",
                         "--max-concurrent-rpcs", "64",
                         "--max-open-streams", str(OPEN_STREAMS),
                         env={"CLIPSEARCH_AUTH_TOKENS": TOKEN}).start()
    yield proc
    assert proc.stop() == 0, proc.log()


def test_open_watch_streams_cannot_starve_authenticated_calls(
        token_server: ServerProcess) -> None:
    request = health_pb2.HealthCheckRequest(service="")
    with grpc.insecure_channel(token_server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        watches = [stub.Watch(request) for _ in range(WATCHERS)]
        open_, refused = 0, 0
        try:
            for watch in watches:
                try:
                    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
                    open_ += 1
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                    refused += 1
            assert (open_, refused) == (OPEN_STREAMS, WATCHERS - OPEN_STREAMS)
            # with every open-stream slot taken, the service and health checks still answer
            assert stub.Check(request, timeout=10).status == \
                health_pb2.HealthCheckResponse.SERVING
            with Client(token_server.address, token=TOKEN) as c:
                for _ in range(3):
                    assert c.collections() == []
                    assert c.info().dim > 0
        finally:
            for watch in watches:
                watch.cancel()
    # the slots come back when the streams end
    with grpc.insecure_channel(token_server.address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(request)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()


class _Context:
    """Just what the budget uses of a servicer context: abort."""

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _Aborted(code, details)


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code


def test_service_calls_keep_their_own_cap() -> None:
    """ClipSearch calls beyond --max-concurrent-rpcs are refused by the budget, not grpc."""
    import asyncio

    from clipsearch_server.doors.admission import CallBudgetInterceptor

    release = asyncio.Event()

    async def slow(request: object, context: object) -> str:
        await release.wait()
        return "done"

    async def continuation(details: object) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(slow)

    class Details:
        method = "/clipsearch.v1.ClipSearchService/Search"
        invocation_metadata = ()

    async def go() -> None:
        budget = CallBudgetInterceptor(max_service_calls=2, max_open_streams=1)
        handler = await budget.intercept_service(continuation, Details())
        first = [asyncio.create_task(handler.unary_unary(None, _Context())) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(_Aborted) as refused:
            await handler.unary_unary(None, _Context())
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        release.set()
        assert await asyncio.gather(*first) == ["done", "done"]
        assert budget.service.used == 0
        assert await handler.unary_unary(None, _Context()) == "done"  # room again

    asyncio.run(go())
