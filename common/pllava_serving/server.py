"""A ``grpc.aio`` server with what both PLLaVA servers need, and its lifecycle.

::

    server, port, state = await create_server("127.0.0.1:0", [Service.pllava("Encoder", servicer)])
    await server.start()
    log.info("listening on %s", format_address(host, port))   # tests parse this line
    ...load and warm up the model...
    await state.set_serving()
    await serve_forever(server, state, grace_s=10)

:func:`create_server` adds the standard health service (every service NOT_SERVING until
:meth:`ServingState.set_serving`), server reflection, the message-size and keepalive options
of :func:`pllava_client.channel.server_options`, the error interceptor and the drain
interceptor, (given a registry) the RPC metrics interceptor, and with a
:class:`~pllava_serving.security.ServerSecurity` TLS and the token check (outermost, so a
refused call costs nothing else; refusals are counted on their own). Binding port 0 picks a
free port, which the caller logs.

Shutdown (:func:`serve_forever`, on SIGTERM or SIGINT):

1. health turns NOT_SERVING for every service, so load balancers and Docker stop sending;
2. new RPCs of our services are refused with UNAVAILABLE ("shutting down"), a status the
   decoder and gRPC retry policies answer by trying another replica; health and reflection
   keep answering while RPCs drain, so a watcher (a health Watch stream, as the decoder
   holds on its encoders) sees NOT_SERVING rather than a closed port; an idle server goes
   on to close at once, so a periodic probe may only see the port close;
3. RPCs already running (whole streams) get up to ``grace_s`` seconds to finish;
4. ``server.stop()`` closes the port and cancels whatever is left.

A second signal skips the wait.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import signal
import sys
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from pllava_client.channel import MAX_MESSAGE_BYTES, server_options
from pllava_proto.v1 import pllava_pb2, pllava_pb2_grpc

from .errors import ErrorInterceptor, Unavailable, wrap_handler
from .logs import setup_logging
from .metrics import RpcMetricsInterceptor
from .parent_death import die_with_parent_from_env
from .security import ServerSecurity
from .settings import given_flags, load_settings

log = logging.getLogger(__name__)

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name  # grpc.health.v1.Health
_ALWAYS_ANSWERED = (f"/{HEALTH_SERVICE}/", f"/{reflection.SERVICE_NAME}/")


@dataclass(frozen=True)
class Service:
    """One gRPC service to serve: its full name, the servicer, and the generated adder."""

    name: str                                        # e.g. "pllava.v1.Encoder"
    servicer: object
    add_to_server: Callable[[object, grpc.aio.Server], None]

    @classmethod
    def pllava(cls, short_name: str, servicer: object) -> "Service":
        """A service of ``pllava.v1`` by its short name ("Encoder" or "Decoder")."""
        descriptor = pllava_pb2.DESCRIPTOR.services_by_name[short_name]
        adder = getattr(pllava_pb2_grpc, f"add_{short_name}Servicer_to_server")
        return cls(descriptor.full_name, servicer, adder)


class ServingState:
    """Health status and in-flight RPCs of one server (what shutdown needs to know)."""

    def __init__(self, service_names: Sequence[str]):
        self.health = health.aio.HealthServicer()
        self.service_names = ("", *service_names)  # "" = the server as a whole
        self.draining = False
        self.stopping = False  # cutting the RPCs still running after the grace period
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def _set_all(self, status) -> None:
        for name in self.service_names:
            await self.health.set(name, status)

    async def set_serving(self) -> None:
        """Model loaded and warmed up: every service SERVING."""
        await self._set_all(health_pb2.HealthCheckResponse.SERVING)

    async def set_not_serving(self) -> None:
        await self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)

    async def start_draining(self) -> None:
        """NOT_SERVING for good, and refuse new RPCs of our services from now on."""
        self.draining = True
        await self.health.enter_graceful_shutdown()  # every known service -> NOT_SERVING, for good

    def is_stopping(self) -> bool:
        return self.stopping

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no RPC of our services is running; False if ``timeout`` passes first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def _enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def _leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()


class _DrainInterceptor(grpc.aio.ServerInterceptor):
    """Counts running RPCs of our services and refuses new ones once draining."""

    def __init__(self, state: ServingState):
        self.state = state

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(_ALWAYS_ANSWERED):
            return handler
        return wrap_handler(handler, self._track, handler_call_details.method)

    @contextlib.asynccontextmanager
    async def _track(self, request, context, method: str):
        if self.state.draining:
            raise Unavailable("the server is shutting down; retry on another replica")
        self.state._enter()
        try:
            yield
        finally:
            self.state._leave()


def format_address(host: str, port: int) -> str:
    """``host:port``, with brackets around an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


async def create_server(address: str, services: Sequence[Service], *,
                        max_message_bytes: int = MAX_MESSAGE_BYTES,
                        registry: CollectorRegistry | None = None,
                        security: ServerSecurity | None = None,
                        max_concurrent_rpcs: int | None = None) -> tuple[grpc.aio.Server, int, ServingState]:
    """A bound, not yet started server for ``services`` at ``address`` ("host:port"; port 0
    picks a free one). Returns ``(server, bound_port, state)``; every service reports
    NOT_SERVING until ``await state.set_serving()``. With a ``registry``, every RPC's final
    status is counted there (:class:`pllava_serving.metrics.RpcMetricsInterceptor`).
    ``security`` None: plaintext, no tokens. Beyond ``max_concurrent_rpcs`` RPCs at once
    (None: no limit), gRPC answers RESOURCE_EXHAUSTED without reading the request: the bound
    on what a flood of large messages costs (they are read whole before any check of ours).

    A coroutine because the aio server and the health servicer belong to the running loop.
    """
    state = ServingState([s.name for s in services])
    security = security or ServerSecurity()
    # Error mapping sits inside the drain check, so a refused RPC's Unavailable also becomes
    # a status code through the one mapping; the metrics sit outside both and count the
    # status the mapping chose.
    # No SO_REUSEPORT: a second server on a taken port must fail, not silently share it.
    options = server_options(max_message_bytes) + [("grpc.so_reuseport", 0)]
    interceptors = [ErrorInterceptor(stopping=state.is_stopping), _DrainInterceptor(state)]
    if registry is not None:
        interceptors.insert(0, RpcMetricsInterceptor(registry, stopping=state.is_stopping))
    # The token check is outermost: a refused call reaches nothing else, and an unknown method
    # name of a caller without a token never becomes a metrics label.
    server = grpc.aio.server(options=options, interceptors=[*security.interceptors(registry), *interceptors],
                             maximum_concurrent_rpcs=max_concurrent_rpcs)
    for service in services:
        service.add_to_server(service.servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(state.health, server)
    reflection.enable_server_reflection([s.name for s in services] + [HEALTH_SERVICE, reflection.SERVICE_NAME],
                                        server)
    try:
        port = security.add_port(server, address)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {address}: {exc}") from exc
    if port == 0:
        raise OSError(f"cannot listen on {address} (address in use or not available on this machine)")
    await state.set_not_serving()  # not the health servicer's default, SERVING for ""
    return server, port, state


def freeze_startup_heap() -> tuple[int, float]:
    """Collect once, then leave every object alive now (the model, MindSpore, gRPC: what a
    server loaded and keeps for its life) out of the collector's later passes. Call it once
    warmed up, before turning SERVING. A full pass walks every tracked object, holding the GIL
    and so the engine thread: ~80 ms over a process with the benchmark model's language side
    (and transformers) loaded, ~2.5x a decode step of 7 streams, whenever one falls due. Returns
    the objects frozen and the seconds the collection took (for the log)."""
    start = time.perf_counter()
    gc.collect()
    seconds = time.perf_counter() - start
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("startup heap frozen: %d objects left out of later collections (a full one took %.0f ms)",
             frozen, seconds * 1e3)
    return frozen, seconds


async def stop_server(server: grpc.aio.Server, state: ServingState, grace_s: float) -> None:
    """Close the port and cut the RPCs still running after ``grace_s``: their clients get
    UNAVAILABLE (and retry elsewhere), and that is what the logs and metrics say of them,
    not that the clients went away."""
    state.stopping = True
    await server.stop(grace_s)


async def serve_forever(server: grpc.aio.Server, state: ServingState, grace_s: float,
                        on_shutdown: Callable[[], Awaitable[None]] | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully (see the module docstring).

    ``on_shutdown`` runs after the server has stopped (release the engine, worker pools).
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            log.warning("%s again: stopping now", sig.name)
            hurry.set()
        else:
            log.info("%s received: shutting down", sig.name)
        stop.set()

    hurry = asyncio.Event()
    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await stop.wait()
        started = time.monotonic()
        await state.start_draining()
        log.info("draining: health NOT_SERVING, new RPCs refused, %d in flight, up to %g s to finish",
                 state.in_flight, grace_s)
        waiters = [asyncio.ensure_future(state.wait_idle(grace_s)), asyncio.ensure_future(hurry.wait())]
        done, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        if state.in_flight:
            log.warning("stopping with %d RPC(s) still running; they are cancelled", state.in_flight)
        left = 0.0 if hurry.is_set() else max(0.0, grace_s - (time.monotonic() - started))
        await stop_server(server, state, min(left, 1.0))
        log.info("stopped")
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        if on_shutdown is not None:
            await on_shutdown()


def settings_from_command_line(prog: str, parser: argparse.ArgumentParser, settings_cls, env_prefix: str,
                               argv: Sequence[str] | None = None):
    """A server's settings from YAML < environment < flags, with logging set up and the
    settings logged; None (after one line on stderr saying why) when they are invalid."""
    args = parser.parse_args(argv)
    try:
        settings = load_settings(settings_cls, yaml_path=args.config, env_prefix=env_prefix,
                                 overrides=given_flags(args, settings_cls))
    except ValueError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return None
    setup_logging(settings.log_level)
    log.info("settings: %s", settings)
    return settings


def run_main(prog: str, parser: argparse.ArgumentParser, settings_cls, env_prefix: str,
             serve: Callable[[object], Awaitable[None]], argv: Sequence[str] | None = None) -> int:
    """A server's console script: settings from YAML < environment < flags, logging, then
    ``serve(settings)`` until SIGTERM. Exit 2 for bad settings, 1 when start-up fails (with
    one clear line for a missing model or a taken port), 0 after a clean shutdown. Started by
    ``pllava up`` (:func:`~pllava_serving.parent_death.parent_death_env`), it ends with it."""
    die_with_parent_from_env()
    settings = settings_from_command_line(prog, parser, settings_cls, env_prefix, argv)
    if settings is None:
        return 2
    try:
        asyncio.run(serve(settings))
    except KeyboardInterrupt:
        pass
    except (OSError, ValueError) as exc:  # model folder missing or bad, port taken
        log.debug("start-up failed", exc_info=True)
        log.error("%s failed: %s", prog, exc)
        return 1
    except Exception:
        log.exception("%s failed", prog)
        return 1
    return 0
