"""Fetching media URLs without handing the network behind the server to its clients.

A front end that downloads what a request names would otherwise fetch whatever the request
points at: a cloud metadata service (169.254.169.254), a database console on 10.0.0.5, the
decoder's own port. So every connection a download makes (the first, and one per redirect)
is checked where it lands: the address the socket is connected to must be a public one
(``ipaddress``'s ``is_global``; loopback, private, link-local, shared and reserved ranges and
IPv4 addresses mapped into IPv6 are not), unless the operator allows private hosts too.
Checking the connected peer, not a name looked up beforehand, leaves no gap for a name that
resolves differently the second time. Redirects stay on http/https, never from https down
to http, at most :data:`MAX_REDIRECTS` of them; no proxy is used (a proxy would be the peer).

The whole fetch, connecting and headers and redirects included, ends at one deadline: a
timer shuts the sockets down when it passes, so a server that sends a byte at a time cannot
hold a request past it.
"""
from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from urllib.parse import urlparse

#: Redirects one download may follow.
MAX_REDIRECTS = 3


class BlockedHost(OSError):
    """A connection went to an address the operator does not allow downloads from."""


def is_public(address: str) -> bool:
    """Whether downloads may connect to ``address`` (an IP as ``getpeername`` gives it)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


class Download:
    """One download: its rules and its deadline, shared by every connection it opens.

        with Download(timeout_s, allow_private) as download:
            with download.open(url, headers) as response:
                ...
            if download.expired: ...   # the deadline cut it short (a read may just have ended)
    """

    def __init__(self, timeout_s: float, allow_private: bool):
        self.allow_private = allow_private
        self.deadline = time.monotonic() + timeout_s
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(timeout_s, self._expire)
        self._timer.daemon = True
        self._timer.start()
        self._opener = urllib.request.OpenerDirector()  # no proxy, no ftp:, file: or data:
        for handler in (_HTTPHandler(self), _HTTPSHandler(self), _RedirectHandler(),
                        urllib.request.HTTPDefaultErrorHandler(), urllib.request.HTTPErrorProcessor()):
            self._opener.add_handler(handler)

    def open(self, url: str, headers: dict[str, str]):
        """The response to GET ``url`` (urllib's errors for what fails)."""
        return self._opener.open(urllib.request.Request(url, headers=headers),
                                 timeout=max(0.0, self.deadline - time.monotonic()))

    def connect(self, address, timeout=None, source_address=None) -> socket.socket:
        """``socket.create_connection`` within the deadline, refused where the connected peer
        is not allowed."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            self._expire()
            raise OSError("the download's deadline passed")
        limit = min(left, timeout) if isinstance(timeout, (int, float)) else left
        sock = socket.create_connection(address, limit, source_address)
        if not self.allow_private and not is_public(sock.getpeername()[0]):
            sock.close()
            raise BlockedHost(f"{address[0]} is not a public address; this server downloads media from "
                              "public hosts only (allow_private_media_hosts)")
        with self._lock:
            if self.expired:
                sock.close()
                raise OSError("the download's deadline passed")
            self._sockets.append(sock)
        return sock

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # wakes a read blocked on it
                except OSError:
                    pass

    def __enter__(self) -> "Download":
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()


def _connection(base: type, download: Download) -> type:
    class Connection(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._create_connection = download.connect
    return Connection


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, download: Download):
        super().__init__()
        self._connection = _connection(http.client.HTTPConnection, download)

    def http_open(self, req):
        return self.do_open(self._connection, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, download: Download):
        super().__init__(context=ssl.create_default_context())
        self._connection = _connection(http.client.HTTPSConnection, download)

    def https_open(self, req):
        return self.do_open(self._connection, req, context=self._context)


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    max_redirections = MAX_REDIRECTS

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        old, new = urlparse(req.full_url).scheme.lower(), urlparse(newurl).scheme.lower()
        if new not in ("http", "https") or (old == "https" and new == "http"):
            raise urllib.error.HTTPError(newurl, code, f"a redirect from {old} to {new} is not followed",
                                         headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)
