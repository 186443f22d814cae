"""Two "hosts" on one machine: a pair of network namespaces joined by a veth pair.

Side ``a`` (the servers) is 198.18.0.1/24, side ``b`` (the client) 198.18.0.2/24: addresses
from 198.18.0.0/15, which is reserved for benchmarking, so nothing outside the pair is ever a
target. Both namespaces are deleted on exit, also when the body raises. Needs root and
iproute2.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Literal

from kvcake.common.errors import KvcakeError

Side = Literal["a", "b"]
SIDES: tuple[Side, Side] = ("a", "b")
ADDRESSES: dict[Side, str] = {"a": "198.18.0.1", "b": "198.18.0.2"}
_PREFIX_LEN = 24


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], check=False, capture_output=True, text=True)
    if result.returncode != 0:
        raise KvcakeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")


def check_netns_support(why: str = "a network namespace pair") -> None:
    """Raise a clear error when namespaces cannot be made here (not root, no iproute2);
    ``why`` names what needs them, for the message."""
    if shutil.which("ip") is None:
        raise KvcakeError(f"{why}: needs iproute2 (apt-get install iproute2)")
    if os.geteuid() != 0:
        raise KvcakeError(f"{why}: needs root to create network namespaces")


class NetnsPair:
    """Two namespaces (names carry this process id, so parallel runs never collide;
    ``pid`` names a pair another process created)."""

    def __init__(self, tag: str = "kvcake", pid: int | None = None) -> None:
        pid = os.getpid() if pid is None else pid
        self.names: dict[Side, str] = {"a": f"{tag}-a{pid}", "b": f"{tag}-b{pid}"}
        self._veth: dict[Side, str] = {"a": f"kva{pid}"[:15], "b": f"kvb{pid}"[:15]}

    def address(self, side: Side) -> str:
        return ADDRESSES[side]

    def prefix(self, side: Side) -> list[str]:
        """The command prefix that runs a program inside ``side``'s namespace."""
        return ["ip", "netns", "exec", self.names[side]]

    def create(self) -> None:
        check_netns_support()
        try:
            self._build()
        except BaseException:
            self.delete()
            raise

    def _build(self) -> None:
        for side in SIDES:
            _ip("netns", "add", self.names[side])
        _ip("link", "add", self._veth["a"], "type", "veth", "peer", "name", self._veth["b"])
        for side in SIDES:
            ns, veth = self.names[side], self._veth[side]
            _ip("link", "set", veth, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{ADDRESSES[side]}/{_PREFIX_LEN}", "dev", veth)
            _ip("-n", ns, "link", "set", veth, "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def set_link(self, side: Side, up: bool) -> None:
        """Take ``side``'s end of the veth down (the hosts are cut off) or up again."""
        _ip("-n", self.names[side], "link", "set", self._veth[side], "up" if up else "down")

    def delete(self) -> None:
        """Delete both namespaces (the veth pair goes with them); never raises."""
        for name in self.names.values():
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
        # A veth left in the root namespace (failure between add and move) dies with its peer.
        subprocess.run(["ip", "link", "del", self._veth["a"]], check=False, capture_output=True)

    def __enter__(self) -> NetnsPair:
        self.create()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.delete()
