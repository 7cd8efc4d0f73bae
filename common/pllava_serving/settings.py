"""Server settings from defaults, a YAML file, environment variables and flags.

A server's settings are one frozen dataclass. :func:`load_settings` fills it from four
layers, each overriding the one before::

    dataclass defaults  <  YAML file (--config)  <  {PREFIX}{FIELD} env vars  <  flags

Values are checked against the field's annotated type (``int``, ``float``, ``bool``,
``str``, ``tuple[int, ...]`` and ``X | None``; a float must be finite: ``nan`` and ``inf``
are refused); a bad value raises ValueError naming where it came from, so a person knows which line, variable or flag to fix. Flags are declared
explicitly by each server (``--port`` etc., default ``None`` = not given) and passed in as
``overrides``; :func:`given_flags` collects them from an ``argparse.Namespace``.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import types
import typing
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, TypeVar

import yaml

T = TypeVar("T")

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_NONE = ("", "none", "null")


def load_settings(cls: type[T], *, yaml_path: str | os.PathLike | None = None, env_prefix: str = "",
                  overrides: Mapping[str, Any] | None = None,
                  environ: Mapping[str, str] | None = None) -> T:
    """Build the frozen dataclass ``cls`` from defaults < YAML < environment < overrides.

    ``yaml_path``: a YAML mapping of field names to values (``None`` = no file). Unknown keys
    are an error, so a misspelt setting never goes unnoticed.
    ``env_prefix``: ``PLLAVA_ENCODER_`` makes ``PLLAVA_ENCODER_PORT=50051`` set ``port``; an
    unknown variable with the prefix is an error too. Strings are parsed to the field type
    (``true``/``false``, ``1,2,3`` for tuples, ``none`` for an optional field; an empty
    variable for an optional field counts as unset).
    ``overrides``: flag values by field name; ``None`` means the flag was not given.
    ``environ``: the environment to read (default ``os.environ``; tests pass their own).
    """
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"{cls!r} is not a dataclass type")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    values: dict[str, Any] = {}

    if yaml_path is not None:
        for name, value in _read_yaml(Path(yaml_path), known).items():
            values[name] = _coerce(value, hints[name], f"config file {yaml_path}, key {name!r}")

    environ = os.environ if environ is None else environ
    if env_prefix:
        env_names = {env_prefix + name.upper(): name for name in known}
        environ = {k: v for k, v in environ.items() if not _service_link(k, v, env_prefix)}
        unknown = sorted(k for k in environ if k.startswith(env_prefix) and k not in env_names)
        if unknown:
            raise ValueError(f"unknown environment variable(s) {', '.join(unknown)}; the known ones are "
                             + ", ".join(sorted(env_names)))
        for var, name in env_names.items():
            if var not in environ:
                continue
            if not environ[var].strip() and _optional_inner(hints[name])[0]:
                continue  # as if unset (Compose's ${UNSET}): an empty variable never turns TLS or tokens off
            values[name] = _parse_string(environ[var], hints[name], f"environment variable {var}")

    for name, value in (overrides or {}).items():
        if value is None:
            continue
        if name not in known:
            raise ValueError(f"unknown setting {name!r}; the known ones are {', '.join(known)}")
        values[name] = _coerce(value, hints[name], f"flag --{name.replace('_', '-')}")

    return cls(**values)


_SERVICE_LINK_NAMES = re.compile(r"^(SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT_\d+_(TCP|UDP|SCTP)(_\w+)?)$")
_SERVICE_LINK_PORT = re.compile(r"^(tcp|udp|sctp)://")


def _service_link(var: str, value: str, env_prefix: str) -> bool:
    """Whether ``var`` is one of the variables Kubernetes (and Docker's legacy links) give every
    pod for a Service whose name reads like the prefix (a Service ``pllava-decoder`` makes
    ``PLLAVA_DECODER_SERVICE_HOST``, ``PLLAVA_DECODER_PORT=tcp://10.0.0.7:50052``, ...): not a
    setting, so neither refused as unknown nor read as one."""
    if not var.startswith(env_prefix):
        return False
    rest = var[len(env_prefix):]
    return bool(_SERVICE_LINK_NAMES.match(rest) or (rest == "PORT" and _SERVICE_LINK_PORT.match(value)))


def given_flags(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The attributes of ``args`` that are fields of ``cls`` (``None`` = flag not given)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names}


# --------------------------------------------------------------------------- internals

def _read_yaml(path: Path, known: list[str]) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"config file {path}: cannot be read ({exc.strerror or exc})") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"config file {path}: not valid YAML ({exc})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: expected a mapping of setting names to values, "
                         f"got a {type(data).__name__}")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}  # accept flag spelling too
    unknown = sorted(k for k in data if k not in known)
    if unknown:
        raise ValueError(f"config file {path}: unknown setting(s) {', '.join(unknown)}; "
                         f"the known ones are {', '.join(known)}")
    return data


def _optional_inner(tp) -> tuple[bool, Any]:
    """``X | None`` -> (True, X); anything else -> (False, tp)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != len(typing.get_args(tp)):
            if len(args) != 1:
                raise TypeError(f"unsupported settings type {tp!r}")
            return True, args[0]
    return False, tp


def _type_name(tp) -> str:
    """Words for the type a value must have, for error messages."""
    optional, tp = _optional_inner(tp)
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        items = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}
        if len(args) == 2 and args[1] is Ellipsis:
            name = f"a comma-separated list of {items.get(args[0], 'values')}"
        else:
            name = f"a comma-separated list of {len(args)} {items.get(args[0], 'values') if args else 'values'}"
    else:
        name = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string",
                Path: "a path"}.get(tp, getattr(tp, "__name__", str(tp)))
    return f"{name} (or none)" if optional else name


def _coerce(value: Any, tp, source: str) -> Any:
    """Check an already-typed value (from YAML or a flag) against ``tp``."""
    optional, inner = _optional_inner(tp)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{source}: must be {_type_name(tp)}, got none")
    if isinstance(value, str) and inner is not str and inner is not Path:
        return _parse_string(value, tp, source)  # e.g. a quoted number in YAML
    ok = True
    if inner is bool:
        ok = isinstance(value, bool)
    elif inner is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif inner is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        value = float(value) if ok else value
    elif inner is str:
        ok = isinstance(value, str)
    elif inner is Path:
        ok = isinstance(value, (str, os.PathLike))
        value = Path(value) if ok else value
    elif typing.get_origin(inner) is tuple:
        if isinstance(value, (list, tuple)):
            return _tuple(list(value), inner, source, _coerce)
        ok = False
    else:
        raise TypeError(f"unsupported settings type {tp!r}")
    if not ok:
        raise ValueError(f"{source}: must be {_type_name(tp)}, got {value!r}")
    return value


def _parse_string(text: str, tp, source: str) -> Any:
    """Parse an environment variable's (or a quoted YAML value's) text to ``tp``."""
    optional, inner = _optional_inner(tp)
    stripped = text.strip()
    if optional and stripped.lower() in _NONE:
        return None
    if typing.get_origin(inner) is tuple:
        body = stripped[1:-1] if stripped[:1] in "[(" and stripped[-1:] in "])" else stripped
        items = [s.strip() for s in body.split(",")] if body.strip() else []
        return _tuple(items, inner, source, _parse_string)
    if inner is str:
        return text
    if inner is Path:
        return Path(stripped)
    try:
        if inner is bool:
            if stripped.lower() in _TRUE:
                return True
            if stripped.lower() in _FALSE:
                return False
            raise ValueError
        if inner is int:
            return int(stripped)
        if inner is float:
            value = float(stripped)
            if not math.isfinite(value):
                raise ValueError
            return value
    except ValueError:
        raise ValueError(f"{source}: must be {_type_name(tp)}, got {text!r}") from None
    raise TypeError(f"unsupported settings type {tp!r}")


def _tuple(items: list, tp, source: str, convert) -> tuple:
    args = typing.get_args(tp)
    if not args:
        return tuple(items)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(convert(v, args[0], f"{source}, item {i}") for i, v in enumerate(items))
    if len(items) != len(args):
        raise ValueError(f"{source}: must be {_type_name(tp)}, got {len(items)} item(s)")
    return tuple(convert(v, t, f"{source}, item {i}") for i, (v, t) in enumerate(zip(items, args)))


#: The largest ``max_video_bytes`` either server takes: one gRPC message carries the video and
#: the request's other fields, and gRPC's message limits are 32-bit (2 GiB).
MAX_VIDEO_BYTES = (2 << 30) - (64 << 20)

DEVICES = ("CPU", "GPU", "Ascend")
DTYPES = ("float32", "float16", "bfloat16")


def server_problems(settings, env_prefix: str, minimums: Mapping[str, float] = MappingProxyType({})) -> list[str]:
    """What is wrong with the fields every server has (model, port, metrics port, device,
    dtype, log level, TLS, tokens; ``max_video_bytes`` where it has one), plus each field
    named in ``minimums`` that is set and below its minimum."""
    from .logs import LOG_LEVELS

    s = settings
    problems = []
    if not s.model:
        problems.append(f"model is required (--model DIR, {env_prefix}MODEL or 'model:' in the YAML)")
    if not 0 <= s.port <= 65535:
        problems.append(f"port must be in 0..65535, got {s.port}")
    if not 0 <= s.metrics_port <= 65535:
        problems.append(f"metrics_port must be in 0..65535 (0 = no metrics), got {s.metrics_port}")
    elif s.metrics_port and s.metrics_port == s.port:
        problems.append(f"metrics_port must differ from port ({s.port}): gRPC and the metrics need a port each")
    if s.device not in DEVICES:
        problems.append(f"device must be one of {', '.join(DEVICES)}, got {s.device!r}")
    if s.dtype is not None and s.dtype not in DTYPES:
        problems.append(f"dtype must be one of {', '.join(DTYPES)}, got {s.dtype!r}")
    if s.log_level.upper() not in LOG_LEVELS:
        problems.append(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {s.log_level!r}")
    for name, low in minimums.items():
        value = getattr(s, name)
        if value is not None and not value >= low:  # NaN too
            problems.append(f"{name} must be >= {low}, got {value}")
    if getattr(s, "max_video_bytes", 0) > MAX_VIDEO_BYTES:
        problems.append(f"max_video_bytes must be at most {MAX_VIDEO_BYTES} (1984 MiB: a gRPC message is at most "
                        f"2 GiB), got {s.max_video_bytes}")
    problems += tls_problems(s.tls_cert, s.tls_key, s.tls_client_ca, "tls_cert", "tls_key", "tls_client_ca")
    if s.auth_token_file == "":
        problems.append("auth_token_file must name a file (or be left unset for no tokens)")
    return problems


#: RPCs a server holds beyond its captions' own (max_batch + max_queue): health watches of
#: every decoder replica, GetInfo probes, calls being refused.
SPARE_RPCS = 32


def concurrent_rpc_limit(settings) -> int:
    """The most RPCs of any kind the server holds at once: ``max_concurrent_rpcs`` when set,
    else its requests' own room (``max_queue``, plus ``max_batch`` on a decoder) + SPARE_RPCS.
    gRPC refuses the ones beyond with RESOURCE_EXHAUSTED before reading their messages, so a
    flood of large requests costs at most this many messages of memory."""
    if settings.max_concurrent_rpcs is not None:
        return settings.max_concurrent_rpcs
    return settings.max_queue + getattr(settings, "max_batch", 0) + SPARE_RPCS


def tls_problems(cert: str | None, key: str | None, ca: str | None,
                 cert_name: str, key_name: str, ca_name: str) -> list[str]:
    """What is wrong with TLS settings: a certificate goes with its key; a server's client CA
    (``ca_name`` "tls_client_ca") needs the server's certificate; a client's certificate needs
    the CA of the server's certificate (any other ``ca_name``)."""
    problems = []
    if bool(cert) != bool(key):
        problems.append(f"{cert_name} and {key_name} go together: give both or neither")
    if ca_name == "tls_client_ca" and ca and not cert:
        problems.append(f"{ca_name} (require client certificates) needs TLS: set {cert_name} and {key_name} too")
    if ca_name != "tls_client_ca" and cert and not ca:
        problems.append(f"{cert_name} (a client certificate) needs {ca_name}, the CA of the server's certificate")
    for name, value in ((cert_name, cert), (key_name, key), (ca_name, ca)):
        if value == "":
            problems.append(f"{name} must name a file (or be left unset)")
    return problems


def add_server_flags(parser: argparse.ArgumentParser, settings_cls) -> None:
    """The flags every server has (each defaults to None = not given, so YAML and environment
    values show through); a server adds its own after these."""
    from .logs import LOG_LEVELS

    d = {f.name: f.default for f in dataclasses.fields(settings_cls)}
    parser.add_argument("--config", metavar="FILE", help="YAML file of settings (keys are the field names)")
    parser.add_argument("--model", metavar="DIR", help="checkpoint folder (HF layout) or converted .ckpt file")
    parser.add_argument("--host", help=f"interface to listen on (default {d['host']}; 0.0.0.0 in a container)")
    parser.add_argument("--port", type=int, help=f"port (default {d['port']}; 0 = any free port)")
    parser.add_argument("--metrics-port", type=int,
                        help="port of the Prometheus metrics at http://HOST:PORT/metrics, on the same interface "
                             "as gRPC (default 0 = no metrics)")
    parser.add_argument("--device", choices=DEVICES, help="CPU (default), GPU or Ascend")
    parser.add_argument("--device-id", type=int, help="device index (default 0)")
    parser.add_argument("--dtype", choices=DTYPES,
                        help="compute dtype (default: float32 on CPU, bfloat16 on Ascend, float16 on GPU)")
    parser.add_argument("--lora-alpha", type=float, help="LoRA alpha of PEFT checkpoints (default 4)")
    parser.add_argument("--num-frames", type=int,
                        help="frames per video when a request says 0 (default: the checkpoint's)")
    parser.add_argument("--max-concurrent-rpcs", type=int,
                        help="RPCs of any kind held at once; gRPC refuses more with RESOURCE_EXHAUSTED before "
                             f"reading them (default: max_queue (+ max_batch) + {SPARE_RPCS})")
    parser.add_argument("--grace-s", type=float,
                        help=f"on SIGTERM, seconds running requests get to finish (default {d['grace_s']:g})")
    parser.add_argument("--log-level", choices=LOG_LEVELS, type=str.upper, help="default INFO")
    tls = parser.add_argument_group("TLS and tokens")
    tls.add_argument("--tls-cert", metavar="FILE",
                     help="serve TLS with this PEM certificate chain (with --tls-key; default: plaintext)")
    tls.add_argument("--tls-key", metavar="FILE", help="the PEM private key of --tls-cert (unencrypted)")
    tls.add_argument("--tls-client-ca", metavar="FILE",
                     help="require client certificates signed by this CA (mutual TLS)")
    tls.add_argument("--auth-token-file", metavar="FILE",
                     help="require 'authorization: Bearer TOKEN' on every RPC but health; the file holds "
                          "the accepted tokens, one a line (read again when it changes)")
