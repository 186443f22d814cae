"""A local single-member etcd for tests, ``kvcake up --ha`` and the fault-injection suite."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from kvcake.common.errors import KvcakeError, MetadataError
from kvcake.common.etcd import etcd_client, guarded
from kvcake.common.sockets import free_port
from kvcake.ops.process import ServerProcess

READY = r"ready to serve client requests|serving insecure client"


def etcd_command(data_dir: str | Path, host: str, client_port: int,
                 peer_port: int) -> list[str]:
    """A single-member etcd serving clients on ``host:client_port``."""
    binary = shutil.which("etcd")
    if binary is None:
        raise KvcakeError("the etcd server binary is not installed (Debian: etcd-server)")
    name = f"kvcake-{client_port}"
    client, peer = f"http://{host}:{client_port}", f"http://{host}:{peer_port}"
    return [
        binary, "--data-dir", str(data_dir), "--name", name,
        "--listen-client-urls", client, "--advertise-client-urls", client,
        "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
        "--initial-cluster", f"{name}={peer}",
        "--heartbeat-interval", "50", "--election-timeout", "500",
    ]


def start_etcd(data_dir: str | Path, timeout_s: float = 30.0) -> tuple[ServerProcess, str]:
    """A single-member etcd on loopback ephemeral ports; the process and ``HOST:PORT``."""
    client, peer = free_port(), free_port()
    process = ServerProcess(etcd_command(data_dir, "127.0.0.1", client, peer), READY,
                            timeout_s, name="etcd")
    endpoint = f"127.0.0.1:{client}"
    _wait_until_serving(endpoint, process, timeout_s)
    return process, endpoint


def _wait_until_serving(endpoint: str, process: ServerProcess, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    client = etcd_client(endpoint, timeout_s=2.0)
    try:
        while True:
            try:
                guarded(lambda: client.get("/kvcake/probe"))
                return
            except MetadataError:
                if time.monotonic() > deadline or not process.alive():
                    process.stop()
                    raise KvcakeError(f"etcd did not serve: {process.tail()}") from None
                time.sleep(0.1)
    finally:
        client.close()
