"""A ``video_url`` / ``image_url`` URL -> the bytes of the video or image it names.

- ``data:<type>/<subtype>;base64,<data>``, with a ``video/*`` or ``image/*`` media type (or
  ``application/octet-stream``): always accepted, the way to send media to a remote server.
- ``file://`` URLs and plain paths: only under the folder the operator allows
  (``allowed_media_root``; off by default). Relative paths are taken from that folder, and a
  path that leaves it (``..``, a symbolic link) is refused.
- ``http://`` and ``https://``: downloaded only when the operator allows it
  (``allow_remote_media``; off by default), within ``download_timeout_s`` in all, and from
  public addresses only unless ``allow_private_media_hosts`` (see :mod:`.downloads`).

Every media is at most ``max_media_bytes`` (413 beyond); every other refusal is a 400 whose
message says what to send instead. Whether the bytes are a video the decoder judges.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import http.client
import os
import re
import stat
import urllib.error
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from pllava_serving.errors import display_name

from .api_errors import ApiError, bad_request
from .chat_request import MediaPart
from .downloads import Download
from .settings import OpenAISettings

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
#: type/subtype as RFC 6838 spells them (no spaces, quotes or control characters)
_MEDIA_TYPE = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]{0,63}/[a-z0-9][a-z0-9!#$&^_.+-]{0,63}$")
#: bytes read from a download at a time, between checks of its deadline
_DOWNLOAD_PIECE_BYTES = 1 << 20
_MEDIA_TYPES = ("video/", "image/")
_OPAQUE_MEDIA_TYPE = "application/octet-stream"
_PARAM = "messages[0].content"


@dataclass(frozen=True)
class Media:
    """What the decoder is sent: the file's bytes, and a name that only labels it in logs.
    ``in_body``: the bytes came in the request body (a data URL), not from a file or a
    download."""

    data: bytes
    name: str
    in_body: bool = False


class MediaLoader:
    """Turns media parts into bytes under the operator's rules (see the module docstring)."""

    def __init__(self, settings: OpenAISettings, executor: Executor | None = None):
        """``executor`` runs the blocking reads and downloads (None: the loop's default pool)."""
        self.executor = executor
        self.max_bytes = settings.max_media_bytes
        self.root = Path(os.path.realpath(settings.allowed_media_root)) if settings.allowed_media_root else None
        self.allow_remote = settings.allow_remote_media
        self.download_timeout_s = settings.download_timeout_s
        self.allow_private = settings.allow_private_media_hosts

    async def load(self, part: MediaPart) -> Media:
        """The bytes ``part`` names; :class:`ApiError` when they may not or cannot be had."""
        url = part.url.strip()
        match = _SCHEME.match(url)
        scheme = match.group(1).lower() if match else ""
        if scheme == "data":
            return await self._off_loop(self._data_url, url)
        if scheme in ("", "file"):
            return await self._off_loop(self._local_file, url, scheme)
        if scheme in ("http", "https"):
            return await self._off_loop(self._download, url)
        raise bad_request(f"{part.kind} URLs of scheme {scheme!r} are not supported; send a data: URL "
                          f"(data:video/mp4;base64,...)", _PARAM)

    async def _off_loop(self, function, *arguments) -> Media:
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, *arguments)

    # ---- data: ---------------------------------------------------------------------------------
    def _data_url(self, url: str) -> Media:
        header, comma, payload = url[len("data:"):].partition(",")
        if not comma:
            raise bad_request("a data URL needs a comma before its data: data:video/mp4;base64,<data>", _PARAM)
        params = [p.strip() for p in header.split(";")]
        media_type = params[0].lower()
        if "base64" not in (p.lower() for p in params[1:]):
            raise bad_request("a data URL must be base64-encoded: data:video/mp4;base64,<data>", _PARAM)
        if not (_MEDIA_TYPE.match(media_type)
                and (media_type.startswith(_MEDIA_TYPES) or media_type == _OPAQUE_MEDIA_TYPE)):
            shown = repr(media_type[:80]) if media_type else "missing"
            raise bad_request(f"the data URL's media type is {shown}; a video/... or image/... "
                              "type is expected (e.g. data:video/mp4;base64,...)", _PARAM)
        payload = "".join(payload.split())  # line breaks some encoders add
        if len(payload) // 4 * 3 > self.max_bytes + 2:
            raise self._too_large(len(payload) // 4 * 3, "the data URL's media")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise bad_request(f"the data URL's data is not valid base64 ({exc})", _PARAM) from None
        if not data:
            raise bad_request("the data URL holds no data", _PARAM)
        self._check_size(len(data), "the data URL's media")
        return Media(data, f"data URL ({media_type})", in_body=True)

    # ---- files ---------------------------------------------------------------------------------
    def _local_file(self, url: str, scheme: str) -> Media:
        if self.root is None:
            raise bad_request("file paths and file:// URLs are off on this server: send the video as a data URL "
                              "(data:video/mp4;base64,...); the operator can allow a folder with "
                              "--allowed-media-root", _PARAM)
        if scheme == "file":
            parsed = urlparse(url)
            if parsed.netloc not in ("", "localhost"):
                raise bad_request(f"file URLs must name this machine (file:///path), not {parsed.netloc!r}", _PARAM)
            path = unquote(parsed.path)
        else:
            path = url
        shown = display_name(path)  # a path may hold line breaks that would forge log lines
        try:
            real = Path(os.path.realpath(self.root / path))  # an absolute path replaces the root
        except ValueError:  # a NUL byte
            raise bad_request("the file path is not a valid path", _PARAM) from None
        outside = bad_request(f"{shown} is not under the folder this server allows media from", _PARAM)
        if not real.is_relative_to(self.root):
            raise outside
        try:
            # Checked again on what was opened, not on the name: a folder swapped for a link
            # between the check above and the open cannot lead out, and a FIFO or a device
            # is refused without blocking on it (O_NONBLOCK).
            fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise bad_request(f"{shown}: no such file under the allowed media folder", _PARAM) from None
        except OSError as exc:
            raise bad_request(f"{shown} cannot be read: {exc.strerror or exc}", _PARAM) from None
        with os.fdopen(fd, "rb") as f:
            opened = Path(os.path.realpath(f"/proc/self/fd/{fd}")) if os.path.isdir("/proc/self/fd") else real
            if not opened.is_relative_to(self.root):
                raise outside
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise bad_request(f"{shown} is not a file", _PARAM)
            self._check_size(info.st_size, shown)
            try:
                data = f.read(self.max_bytes + 1)  # a file that grew since fstat stops here
            except OSError as exc:
                raise bad_request(f"{shown} cannot be read: {exc.strerror or exc}", _PARAM) from None
        self._check_size(len(data), shown)
        return Media(data, real.name)

    # ---- downloads -----------------------------------------------------------------------------
    def _download(self, url: str) -> Media:
        shown = _without_secrets(url)  # what messages, logs and the media's name may carry
        if not self.allow_remote:
            raise bad_request("downloading media is off on this server: send the video as a data URL "
                              "(data:video/mp4;base64,...); the operator can turn downloads on with "
                              "--allow-remote-media", _PARAM)
        late = bad_request(f"downloading {shown} took longer than {self.download_timeout_s:g} s "
                           "(download_timeout_s)", _PARAM)
        with Download(self.download_timeout_s, self.allow_private) as download:
            try:
                with download.open(url, {"User-Agent": "pllava-openai"}) as response:
                    declared = response.headers.get("Content-Length")
                    if declared and declared.isdigit():
                        self._check_size(int(declared), shown)
                    data = self._read(response)
            except urllib.error.HTTPError as exc:
                raise bad_request(f"could not download {shown}: HTTP {exc.code} {exc.reason}", _PARAM) from None
            except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
                if download.expired:
                    raise late from None
                reason = getattr(exc, "reason", None) or exc
                raise bad_request(f"could not download {shown}: {reason}", _PARAM) from None
            if download.expired:  # the deadline cut the body short
                raise late
        self._check_size(len(data), shown)
        if not data:
            raise bad_request(f"{shown} is empty", _PARAM)
        return Media(data, os.path.basename(urlparse(url).path) or shown)

    def _read(self, response) -> bytes:
        """The response's body, at most ``max_bytes`` + 1 of it (the fetch's deadline ends it)."""
        pieces, size = [], 0
        while size <= self.max_bytes:
            piece = response.read1(min(_DOWNLOAD_PIECE_BYTES, self.max_bytes + 1 - size))
            if not piece:
                break
            pieces.append(piece)
            size += len(piece)
        return b"".join(pieces)

    # ---- limits --------------------------------------------------------------------------------
    def _check_size(self, size: int, what: str) -> None:
        if size > self.max_bytes:
            raise self._too_large(size, what)

    def _too_large(self, size: int, what: str) -> ApiError:
        return ApiError(413, f"{what} is {size} bytes; this server takes at most {self.max_bytes} bytes "
                             "(max_media_bytes)", param=_PARAM)


def _without_secrets(url: str) -> str:
    """``url`` without what may be a credential: a user and password, the query (a pre-signed
    URL's signature) and the fragment. Messages, logs and the media's name use this form."""
    parts = urlparse(url)
    host = parts.hostname or ""
    if ":" in host:  # IPv6
        host = f"[{host}]"
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:  # a port that is not a number: the URL fails to download anyway
        port = ""
    hidden = " (query left out)" if parts.query or parts.fragment else ""
    return display_name(f"{parts.scheme}://{host}{port}{parts.path}{hidden}")
