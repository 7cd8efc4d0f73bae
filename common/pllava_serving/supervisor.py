"""Keeps the servers of ``pllava up`` running: one that exits is started again, on its port.

A dead encoder used to stop the whole cluster. Now :class:`Supervisor` notices the exit, logs
it with the server's last lines, waits a back-off (1 s, then doubling up to 30 s while the
server keeps dying, back to 1 s once it has stayed up a minute) and starts the same command
on the same port (:meth:`ServerProcess.restart`): the decoder's static encoder target and the
clients' decoder address stay valid, and the other servers never stop. The decoder's encoder
channel sends calls only to SERVING replicas, so a restarted encoder gets work the moment it
has loaded, and captions that were on the dead one are retried on the others.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence, TextIO

import grpc

from pllava_client.health import check_health

from .console import write_line

if TYPE_CHECKING:
    from pllava_client.security import ClientTls

    from .launcher import ServerProcess

INITIAL_BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0
#: A server that has run this long since its last start counts as healthy again: its next
#: exit is restarted after INITIAL_BACKOFF_S.
STABLE_AFTER_S = 60.0


@dataclass
class _Watch:
    server: "ServerProcess"
    started_at: float
    backoff_s: float
    restart_at: float | None = None  # set while the server is dead and waiting to be restarted
    awaiting_serving: bool = False  # restarted, not SERVING yet


class Supervisor:
    """Call :meth:`tick` every fraction of a second; it restarts servers that exited."""

    def __init__(self, servers: Sequence["ServerProcess"], log: TextIO | None = None, *,
                 ready: Callable[["ServerProcess"], bool] | None = None,
                 initial_backoff_s: float = INITIAL_BACKOFF_S, max_backoff_s: float = MAX_BACKOFF_S,
                 stable_after_s: float = STABLE_AFTER_S, clock: Callable[[], float] = time.monotonic):
        """``ready(server)`` says whether a restarted server serves again (default: its gRPC
        health service answers SERVING)."""
        self.log = log
        self.ready = ready or grpc_serving
        self.initial_backoff_s = initial_backoff_s
        self.max_backoff_s = max_backoff_s
        self.stable_after_s = stable_after_s
        self.clock = clock
        now = clock()
        self._watches = [_Watch(s, now, initial_backoff_s) for s in servers]

    def _say(self, text: str) -> None:
        try:
            write_line(self.log or sys.stderr, f"pllava up: {text}")
        except (OSError, ValueError):  # the log stream went away
            pass

    def tick(self) -> None:
        for watch in self._watches:
            self._check(watch, self.clock())

    def _check(self, w: _Watch, now: float) -> None:
        server = w.server
        if w.restart_at is not None:
            if now >= w.restart_at:
                server.restart()
                w.started_at, w.restart_at, w.awaiting_serving = now, None, True
                w.backoff_s = min(w.backoff_s * 2, self.max_backoff_s)
                self._say(f"{server.name} restarted (pid {server.pid}, restart {server.restarts})")
            return
        if server.alive():
            if w.awaiting_serving and server.address is not None and self.ready(server):
                w.awaiting_serving = False
                self._say(f"{server.name} is SERVING again at {server.address}, {now - w.started_at:.1f} s "
                          "after its restart")
            return
        status = server.process.poll()
        if now - w.started_at >= self.stable_after_s:
            w.backoff_s = self.initial_backoff_s
        w.restart_at = now + w.backoff_s
        where = f" on {server.address}" if server.address else ""
        self._say(f"{server.name} exited with status {status}; restarting it in {w.backoff_s:g} s{where}; "
                  f"the other servers keep running. Its last lines:\n{server.tail()}")


def grpc_serving(server: "ServerProcess", tls: "ClientTls | None" = None) -> bool:
    """Whether ``server``'s gRPC health service answers SERVING now (over TLS with ``tls``)."""
    try:
        return check_health(server.address, timeout=0.5, tls=tls) == "SERVING"
    except grpc.RpcError:
        return False
