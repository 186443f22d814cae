"""Two "hosts": network namespaces joined by a veth pair (198.18.0.0/15, for benchmarking).

Different network namespaces mean different host ids, so the engine must pick ``tcp``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest

from kvcake.transfer.peer import PeerProcess

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("ip") is None,
        reason="network namespaces need root and iproute2 (CI runs as root)",
    ),
]

CLIENT = """
import json, os, sys
from kvcake.transfer.config import TransferConfig
from kvcake.transfer import TransferEngine
from kvcake.transfer.peer import pattern
with TransferEngine(TransferConfig(host="198.18.0.2", timeout_s=10)) as engine:
    remote = engine.open_segment(sys.argv[1])
    got = bytearray(remote.size)
    engine.read(remote, 0, memoryview(got))
    blob = os.urandom(3 << 20)
    engine.write(remote, 4096, memoryview(blob))
    back = bytearray(len(blob))
    engine.read(remote, 4096, memoryview(back))
    print(json.dumps({"transport": remote.transport, "read_ok": got == pattern(3, remote.size),
                      "write_ok": back == blob, "host_id": engine.host_id}))
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def hosts() -> Iterator[tuple[str, str]]:
    a, b = f"kvcake-a{os.getpid()}", f"kvcake-b{os.getpid()}"
    veth_a, veth_b = f"kva{os.getpid()}"[:15], f"kvb{os.getpid()}"[:15]
    try:
        _ip("netns", "add", a)
        _ip("netns", "add", b)
        _ip("link", "add", veth_a, "type", "veth", "peer", "name", veth_b)
        for ns, veth, address in ((a, veth_a, "198.18.0.1/24"), (b, veth_b, "198.18.0.2/24")):
            _ip("link", "set", veth, "netns", ns)
            _ip("-n", ns, "addr", "add", address, "dev", veth)
            _ip("-n", ns, "link", "set", veth, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield a, b
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


def test_engines_on_two_hosts_talk_tcp_and_move_exact_bytes(hosts: tuple[str, str]) -> None:
    host_a, host_b = hosts
    with PeerProcess("kv0", 8 << 20, fill=3, args=["--host", "198.18.0.1"],
                     prefix=["ip", "netns", "exec", host_a]) as peer:
        assert peer.segment.startswith("198.18.0.1:")
        result = subprocess.run(
            ["ip", "netns", "exec", host_b, sys.executable, "-c", CLIENT, peer.segment],
            capture_output=True, text=True, timeout=60, check=True,
        )
    report = json.loads(result.stdout)
    assert report == {"transport": "tcp", "read_ok": True, "write_ok": True,
                      "host_id": report["host_id"]}
    assert report["host_id"] != peer.info["host_id"]
