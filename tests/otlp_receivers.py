"""Real OTLP metric receivers for tests, on 127.0.0.1 only.

``GrpcReceiver`` is a grpcio server with the OTLP MetricsService; ``HttpReceiver`` an aiohttp server
accepting ``POST /v1/metrics`` (application/x-protobuf, gzip-aware) in a background thread. Both keep
every ExportMetricsServiceRequest they accepted, can be stopped and restarted on the same port (an
outage), and can be told to delay or fail requests. ``flatten`` turns requests into one ``Record`` per
data point.
"""

from __future__ import annotations

import asyncio
import gzip
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from aiohttp import web
from background_app import HOST, BackgroundApp
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


# ---- decoding -------------------------------------------------------------------------------------


def any_value(v: AnyValue) -> object:
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return attributes(v.kvlist_value.values)
    return getattr(v, kind)


def attributes(kvs: Iterable[KeyValue]) -> dict[str, object]:
    return {kv.key: any_value(kv.value) for kv in kvs}


@dataclass(frozen=True)
class Record:
    """One data point with everything a test may assert on."""

    name: str
    unit: str
    description: str
    kind: str
    """sum, gauge, histogram or exponential_histogram."""
    attributes: dict[str, object]
    point: Any
    """The protobuf data point (NumberDataPoint, HistogramDataPoint, ExponentialHistogramDataPoint)."""
    resource: dict[str, object]
    scope: str
    temporality: int
    """AggregationTemporality enum value of the metric (0 for gauges): 1 delta, 2 cumulative."""
    is_monotonic: bool

    @property
    def value(self) -> float:
        kind = self.point.WhichOneof("value")
        return float(getattr(self.point, kind)) if kind else 0.0


def flatten(requests: Iterable[ExportMetricsServiceRequest]) -> list[Record]:
    out: list[Record] = []
    for req in requests:
        for rm in req.resource_metrics:
            resource = attributes(rm.resource.attributes)
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    kind = metric.WhichOneof("data")
                    if kind is None:
                        continue
                    data = getattr(metric, kind)
                    for p in data.data_points:
                        out.append(
                            Record(
                                name=metric.name,
                                unit=metric.unit,
                                description=metric.description,
                                kind=kind,
                                attributes=attributes(p.attributes),
                                point=p,
                                resource=resource,
                                scope=sm.scope.name,
                                temporality=int(getattr(data, "aggregation_temporality", 0)),
                                is_monotonic=bool(getattr(data, "is_monotonic", False)),
                            )
                        )
    return out


def find(records: Iterable[Record], name: str, **attrs: object) -> list[Record]:
    """Records named ``name`` whose attributes include ``attrs`` (keys with dots: pass a dict via **)."""
    return [r for r in records if r.name == name and all(r.attributes.get(k) == v for k, v in attrs.items())]


# ---- shared request store ---------------------------------------------------------------------------


class _Store:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._requests: list[ExportMetricsServiceRequest] = []
        self._headers: list[dict[str, str]] = []
        self.attempts = 0
        """Requests that reached the server, accepted or not."""
        self.delay = 0.0
        """Seconds to wait before answering."""
        self.fail = False
        """Answer with a retryable error (gRPC UNAVAILABLE, HTTP 503) instead of accepting."""
        self.accept_limit: int | None = None
        """Fail (as with ``fail``) every request once this many have been accepted."""

    def add(self, req: ExportMetricsServiceRequest, headers: Mapping[str, str]) -> None:
        with self._cond:
            self._requests.append(req)
            self._headers.append(dict(headers))
            self._cond.notify_all()

    def attempted(self) -> None:
        with self._cond:
            self.attempts += 1

    def refuse(self) -> bool:
        """Whether to fail the request being handled."""
        with self._cond:
            return self.fail or (self.accept_limit is not None and len(self._requests) >= self.accept_limit)

    @property
    def requests(self) -> list[ExportMetricsServiceRequest]:
        with self._cond:
            return list(self._requests)

    @property
    def headers(self) -> list[dict[str, str]]:
        with self._cond:
            return list(self._headers)

    def records(self) -> list[Record]:
        return flatten(self.requests)

    def clear(self) -> None:
        with self._cond:
            self._requests.clear()
            self._headers.clear()

    def wait_for(
        self, predicate: Callable[[list[ExportMetricsServiceRequest]], bool], timeout: float = 10.0
    ) -> list[ExportMetricsServiceRequest]:
        """Wait (bounded) until predicate(requests so far) holds; return the requests."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(list(self._requests)):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"receiver: condition not met within {timeout}s ({len(self._requests)} requests)"
                    )
                self._cond.wait(left)
            return list(self._requests)

    def wait_requests(self, n: int, timeout: float = 10.0) -> list[ExportMetricsServiceRequest]:
        return self.wait_for(lambda rs: len(rs) >= n, timeout)


# ---- gRPC -------------------------------------------------------------------------------------------


class _Servicer(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, store: _Store) -> None:
        self._store = store

    def Export(  # the generated service's method name
        self, request: ExportMetricsServiceRequest, context: grpc.ServicerContext
    ) -> ExportMetricsServiceResponse:
        self._store.attempted()
        if self._store.delay:
            time.sleep(self._store.delay)
        if self._store.refuse():
            context.abort(grpc.StatusCode.UNAVAILABLE, "injected failure")
        self._store.add(request, {k: str(v) for k, v in context.invocation_metadata()})
        return ExportMetricsServiceResponse()


class GrpcReceiver(_Store):
    """OTLP/gRPC MetricsService on 127.0.0.1:<port>. Use as a context manager or call stop()."""

    def __init__(self, port: int = 0) -> None:
        super().__init__()
        self.port = port or free_port()
        self._server: grpc.Server | None = None
        self.start()

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> None:
        if self._server is not None:
            return
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(  # type: ignore[no-untyped-call]
            _Servicer(self), server
        )
        bound = server.add_insecure_port(f"{HOST}:{self.port}")
        if bound != self.port:
            server.stop(0)
            raise OSError(f"gRPC receiver could not bind {HOST}:{self.port}")
        server.start()
        self._server = server

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait(5)
            self._server = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> GrpcReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---- HTTP -------------------------------------------------------------------------------------------


class HttpReceiver(_Store):
    """OTLP/HTTP receiver on http://127.0.0.1:<port>/v1/metrics, run by aiohttp in its own thread."""

    def __init__(self, port: int = 0) -> None:
        super().__init__()
        self.port = port or free_port()
        self.encodings: list[str] = []
        """Content-Encoding of every accepted request ("" when none)."""
        self._app = BackgroundApp("otlp-http-receiver", self.port)
        self.start()

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}/v1/metrics"

    async def _handle(self, request: web.Request) -> web.Response:
        self.attempted()
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.refuse():
            return web.Response(status=503, text="injected failure")
        if request.content_type != "application/x-protobuf":
            return web.Response(status=415, text=f"unsupported content type {request.content_type}")
        body = await request.read()
        encoding = request.headers.get("Content-Encoding", "").lower()
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding:
            return web.Response(status=415, text=f"unsupported encoding {encoding}")
        req = ExportMetricsServiceRequest()
        try:
            req.ParseFromString(body)
        except Exception as e:  # a bad body is the sender's bug: tell it like a collector would
            return web.Response(status=400, text=f"bad protobuf: {e}")
        self.encodings.append(encoding)
        self.add(req, dict(request.headers))
        return web.Response(
            body=ExportMetricsServiceResponse().SerializeToString(), content_type="application/x-protobuf"
        )

    def start(self) -> None:
        if not self._app.is_up:
            app = web.Application()
            app.router.add_post("/v1/metrics", self._handle)
            # The body is decompressed here, so that a test sees whether the sender compressed it.
            self._app.call(self._app.serve(app, auto_decompress=False))

    def stop(self) -> None:
        self._app.call(self._app.unserve())

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self._app.close()

    def __enter__(self) -> HttpReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


Receiver = GrpcReceiver | HttpReceiver


def make_receiver(protocol: str) -> Receiver:
    """A started receiver for "grpc" or "http/protobuf"."""
    return GrpcReceiver() if protocol == "grpc" else HttpReceiver()


def close_receiver(r: Receiver) -> None:
    if isinstance(r, HttpReceiver):
        r.close()
    else:
        r.stop()
