"""Prometheus metrics shared by both servers: every RPC's final status, and the HTTP exporter.

Each server owns one :class:`prometheus_client.CollectorRegistry` (never the library's global
one), so two servers in one process, or a test, never share a counter. The server passes that
registry to :func:`create_server <pllava_serving.server.create_server>` (which installs
:class:`RpcMetricsInterceptor`), to its engine's metrics object, and to
:func:`start_metrics_server` when ``metrics_port`` is not 0.

RPC metrics follow the names go-grpc-prometheus made familiar, under the ``pllava_`` prefix:

- ``pllava_grpc_server_started_total{grpc_service, grpc_method, grpc_type}``
- ``pllava_grpc_server_handled_total{grpc_service, grpc_method, grpc_type, grpc_code}``: the
  status every RPC ended with, streams and cancellations included (a client that cancels is
  ``CANCELLED``, a deadline that passes -- or a cancel within a second of it --
  ``DEADLINE_EXCEEDED``);
- ``pllava_grpc_server_handling_seconds{grpc_service, grpc_method, grpc_type}``.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Callable, Iterable

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import start_http_server
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from .errors import ended_early, wrap_handler

log = logging.getLogger(__name__)

#: The server logs this once its exporter is up; ``pllava up`` and the tests read it.
METRICS_LINE = "serving metrics on http://%s/metrics"

#: Seconds, from a fast accelerator step (a few ms) to a slow CPU request (minutes).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0)
#: Seconds per step or per token: a decode step is ~10 ms on an accelerator and ~0.1 s on CPU.
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Counts of things per batch (videos, frames).
SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)

#: Values of the ``input`` label both servers put on some metrics: what a request carried, a
#: video file (or still image) sent whole, or frames the caller sampled and sent as images.
INPUT_VIDEO = "video"
INPUT_FRAMES = "frames"
INPUTS = (INPUT_VIDEO, INPUT_FRAMES)


def new_registry() -> CollectorRegistry:
    """A server's own registry, with the standard ``process_*`` metrics (CPU, memory, open
    files) of this process."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    return registry


class ReadOnCollect(Collector):
    """Metrics whose values an engine already keeps (a cache's hit count, a pool's restarts):
    read when Prometheus scrapes, so the engine keeps plain integers and knows nothing of
    Prometheus. ``kind`` is ``"counter"`` or ``"gauge"``; ``read`` returns the value."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self._metrics: list[tuple[str, str, str, Callable[[], float]]] = []
        self._registry = registry
        if registry is not None:
            registry.register(self)

    def add(self, kind: str, name: str, documentation: str, read: Callable[[], float]) -> None:
        if kind not in ("counter", "gauge"):
            raise ValueError(f"kind must be counter or gauge, got {kind!r}")
        if any(known == name for _, known, _, _ in self._metrics):
            raise ValueError(f"metric {name} is already read here")
        self._metrics.append((kind, name, documentation, read))
        if self._registry is not None:  # registered again, so the registry knows the new name: a
            # scrape filtered by name (/metrics?name[]=...) finds it, and a clash is refused
            self._registry.unregister(self)
            try:
                self._registry.register(self)
            except ValueError:
                self._metrics.pop()
                self._registry.register(self)
                raise

    def describe(self) -> Iterable:
        return self._families(lambda read: 0.0)

    def collect(self) -> Iterable:
        return self._families(lambda read: float(read()))

    def _families(self, value: Callable[[Callable[[], float]], float]):
        for kind, name, documentation, read in self._metrics:
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family(name, documentation, value=value(read))


def _split_method(method: str) -> tuple[str, str]:
    """``/pllava.v1.Decoder/Caption`` -> ``("pllava.v1.Decoder", "Caption")``."""
    service, _, name = method.lstrip("/").rpartition("/")
    return service or "unknown", name or method


def _rpc_type(handler: grpc.RpcMethodHandler) -> str:
    if handler.request_streaming:
        return "bidi_stream" if handler.response_streaming else "client_stream"
    return "server_stream" if handler.response_streaming else "unary"


class RpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts every RPC's start and final status code (see the module docstring).

    Installed outside the error interceptor, so it sees the status an exception was mapped
    to (an ``AbortError`` after ``context.abort``), a normal end (``OK``, or a code the
    handler set), and a cancellation (``CANCELLED``, or ``DEADLINE_EXCEEDED`` when the
    deadline has run out). An RPC whose handler grpc abandons without closing it is counted
    when the call is done.
    """

    def __init__(self, registry: CollectorRegistry, stopping: Callable[[], bool] = lambda: False):
        self._stopping = stopping  # True while the server cuts the calls left at shutdown
        labels = ("grpc_service", "grpc_method", "grpc_type")
        self.started = Counter("pllava_grpc_server_started", "RPCs started, by method",
                               labels, registry=registry)
        self.handled = Counter("pllava_grpc_server_handled", "RPCs finished, by method and final status code",
                               labels + ("grpc_code",), registry=registry)
        self.seconds = Histogram("pllava_grpc_server_handling_seconds",
                                 "Time from an RPC's start to its final status, streams included",
                                 labels, buckets=LATENCY_BUCKETS, registry=registry)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        service, name = _split_method(handler_call_details.method)
        labels = (service, name, _rpc_type(handler))

        @contextlib.asynccontextmanager
        async def count(request, context, method: str):
            self.started.labels(*labels).inc()
            start = time.perf_counter()
            counted = False

            def finish(code: grpc.StatusCode) -> None:
                nonlocal counted
                if not counted:
                    counted = True
                    self.handled.labels(*labels, code.name).inc()
                    self.seconds.labels(*labels).observe(time.perf_counter() - start)

            # The fallback for a handler grpc abandons without closing it.
            context.add_done_callback(lambda _: finish(context.code() or ended_early(context, self._stopping())))
            try:
                yield
            except grpc.aio.AbortError:
                finish(context.code() or grpc.StatusCode.UNKNOWN)
                raise
            except (asyncio.CancelledError, GeneratorExit):  # (a response stream grpc closed)
                finish(ended_early(context, self._stopping()))
                raise
            except BaseException:
                finish(grpc.StatusCode.UNKNOWN)
                raise
            # a handler that returns after its call was cancelled did not succeed
            finish(ended_early(context, self._stopping()) if context.cancelled()
                   else (context.code() or grpc.StatusCode.OK))

        return wrap_handler(handler, count, handler_call_details.method)



class MetricsServer:
    """The HTTP exporter of one registry (``GET /metrics``), on a daemon thread."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int):
        host = host.strip("[]")  # an IPv6 address as --host takes it ([::1]); the HTTP server wants ::1
        try:
            self._httpd, self._thread = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            raise OSError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from exc
        self.port = int(self._httpd.server_address[1])
        self.host = host

    @property
    def address(self) -> str:
        from .server import format_address

        return format_address(self.host, self.port)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def start_metrics_server(registry: CollectorRegistry, host: str, port: int) -> MetricsServer | None:
    """Serve ``registry`` at ``http://host:port/metrics`` and log where; ``port`` 0 = off
    (returns None). Raises OSError naming the address when the port is taken."""
    if not port:
        return None
    # No ``*_created`` series: the text format would expose each as one more series per
    # counter and histogram, which Prometheus stores and nobody queries.
    disable_created_metrics()
    server = MetricsServer(registry, host, port)
    log.info(METRICS_LINE, server.address)
    return server
