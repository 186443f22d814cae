"""``setup``'s arguments, Mooncake's way: the positional form, the ``setup(dict)`` form with
human-readable sizes, and the ``host[:port]`` a client is known by. Pure.

A client's hostname is ``host:port``. Given a port, that name is kept as given (as Mooncake
does, the port need not be bound: it names the client and its segment); without one, the
client takes a free port in ``MIN_PORT..MAX_PORT`` for its transfer server and is known by
it (``get_hostname``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kvcake.common.errors import InvalidParamsError

MIN_PORT, MAX_PORT = 12300, 14300  # Mooncake's MC_STORE_CLIENT_MIN_PORT / _MAX_PORT defaults
DEFAULT_SEGMENT_BYTES = 16 << 20  # Mooncake's DEFAULT_GLOBAL_SEGMENT_SIZE (setup(dict) only)
DEFAULT_LOCAL_BUFFER_BYTES = 16 << 20  # Mooncake's DEFAULT_LOCAL_BUFFER_SIZE
MIN_SIZE_BYTES, MAX_SIZE_BYTES = 1024, 1 << 40  # Mooncake's MIN_SEGMENT_SIZE, MAX_SEGMENT_SIZE
PROTOCOLS = {"tcp": None, "auto": "auto", "shm": "shm"}  # protocol -> kvcake transport

_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "M": 1 << 20, "MB": 1 << 20,
          "G": 1 << 30, "GB": 1 << 30, "T": 1 << 40, "TB": 1 << 40}


@dataclass(frozen=True)
class SetupOptions:
    """What ``setup`` asks for, checked; see :class:`kvcake.store.compat.DistributedStore`."""

    local_hostname: str
    global_segment_size: int = 0
    local_buffer_size: int = DEFAULT_LOCAL_BUFFER_BYTES
    protocol: str = "tcp"
    master_server_addr: str = "127.0.0.1:50051"
    tenant_id: str = ""
    tenant_token: str = ""
    ssd_offload_path: str = ""  # the node's disk tier directory ("" none)
    known_as: str = ""  # the hostname to go by instead (setup_dummy: its node's segment)

    def __post_init__(self) -> None:
        if not self.local_hostname:
            raise InvalidParamsError("local_hostname must not be empty")
        split_hostname(self.local_hostname)
        if self.protocol not in PROTOCOLS:
            raise InvalidParamsError(f"protocol {self.protocol!r} is not supported by kvcake "
                                     f"(no RDMA or accelerator transports): use one of "
                                     f"{', '.join(PROTOCOLS)}")
        if self.global_segment_size < 0 or self.local_buffer_size < 0:
            raise InvalidParamsError("sizes must be >= 0")


def split_hostname(hostname: str) -> tuple[str, int | None]:
    """``host`` and ``port`` (``None`` when none is given) of ``host``, ``host:port`` or
    ``[v6]:port``."""
    if hostname.startswith("["):
        host, _, rest = hostname[1:].partition("]")
        return host, _port(rest[1:]) if rest.startswith(":") else None
    if hostname.count(":") == 1:
        host, _, port = hostname.partition(":")
        return host, _port(port)
    return hostname, None


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise InvalidParamsError(f"port must be 1..65535, got {text!r}")
    return int(text)


def bind_host(host: str) -> str:
    """The address a transfer server for ``host`` binds: ``localhost`` is 127.0.0.1 (one
    address, so the port it gets is the one it is known by)."""
    return "127.0.0.1" if host == "localhost" else host


def parse_size(value: Any) -> int:
    """Mooncake's sizes: bytes, or a number with ``B``, ``K``/``KB`` .. ``T``/``TB``
    (binary, any case, optional space: ``"16MB"``, ``"1.5 GB"``); ``"50%"`` is refused."""
    text = str(value)
    match = _SIZE.match(text)
    unit = match.group(2).upper() if match else ""
    if match is None or unit not in _UNITS:
        raise InvalidParamsError(f"not a size: {text!r} (try 16MB, 1.5 GB or 4096)")
    return int(float(match.group(1)) * _UNITS[unit])


def options_from_dict(config: Mapping[str, Any], tenant_token: str = "") -> SetupOptions:
    """``setup(dict)``: ``local_hostname`` and ``metadata_server`` are required; sizes may
    be human-readable (0, or 1 KB .. 1 TB)."""
    values = {str(k): str(v) for k, v in config.items()}
    for required in ("local_hostname", "metadata_server"):
        if not values.get(required):
            raise InvalidParamsError(f"setup config needs {required}")
    segment = _sized(values, "global_segment_size", DEFAULT_SEGMENT_BYTES)
    buffer = _sized(values, "local_buffer_size", DEFAULT_LOCAL_BUFFER_BYTES)
    ssd = values.get("enable_ssd_offload", "false").lower() in ("1", "true", "yes", "on")
    return SetupOptions(values["local_hostname"], segment, buffer,
                        values.get("protocol", "tcp"),
                        values.get("master_server_addr", "127.0.0.1:50051"),
                        values.get("tenant_id", ""), tenant_token,
                        values.get("ssd_offload_path", "") if ssd else "")


def _sized(values: Mapping[str, str], name: str, default: int) -> int:
    if name not in values:
        return default
    size = parse_size(values[name])
    if size and not MIN_SIZE_BYTES <= size <= MAX_SIZE_BYTES:
        raise InvalidParamsError(f"{name} must be 0 or {MIN_SIZE_BYTES}..{MAX_SIZE_BYTES} "
                                 f"bytes, got {size}")
    return size
