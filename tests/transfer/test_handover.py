"""Same-host mappings rest on memfds handed over by their owners, never on paths."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from kvcake.common.auth import ClusterAuth
from kvcake.common.errors import KvcakeError, TransferError
from kvcake.transfer.batch import TransferOp, TransferRequest
from kvcake.transfer.config import TransferConfig
from kvcake.transfer.engine import TransferEngine
from kvcake.transfer.handover import HandoverRefusedError
from kvcake.transfer.segment import MappedSegment, SegmentDescriptor

SIZE = 1 << 16


@pytest.fixture
def owner() -> Iterator[TransferEngine]:
    engine = TransferEngine(TransferConfig())
    engine.register_segment("kv0", SIZE)
    yield engine
    engine.close()


@pytest.fixture
def peer() -> Iterator[TransferEngine]:
    engine = TransferEngine(TransferConfig())
    yield engine
    engine.close()


def test_a_bound_registrant_gets_the_mapping(owner: TransferEngine, peer: TransferEngine
                                             ) -> None:
    owner.bind("kv0", "store:node-1")
    remote = peer.attach(owner.local_descriptor("kv0", "store:node-1"))
    assert remote.transport == "shm"
    peer.write(remote, 100, memoryview(b"abc"))
    assert bytes(owner._table.get("kv0").view[100:103]) == b"abc"


def test_a_registrant_the_owner_never_bound_gets_no_mapping(owner: TransferEngine,
                                                            peer: TransferEngine) -> None:
    forged = msgspec.structs.replace(owner.local_descriptor("kv0"), registrant="store:thief")
    with pytest.raises(HandoverRefusedError, match="not published by 'store:thief'"):
        MappedSegment(forged)
    assert peer.attach(forged).transport == "tcp"  # the network path still works


def test_a_descriptor_naming_another_pid_is_refused(owner: TransferEngine) -> None:
    forged = msgspec.structs.replace(owner.local_descriptor("kv0"), owner_pid=os.getppid())
    with pytest.raises(HandoverRefusedError, match="not by the segment's owner pid"):
        MappedSegment(forged)


@pytest.mark.parametrize("socket_name", ["/tmp/victim", "/proc/self/fd/0", "../kvcake-seg/1"])
def test_a_path_is_never_opened(owner: TransferEngine, tmp_path: Path, socket_name: str
                                ) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"\0" * SIZE)
    forged = msgspec.structs.replace(owner.local_descriptor("kv0"), shm_socket=socket_name,
                                     shm_inode=victim.stat().st_ino)
    with pytest.raises(HandoverRefusedError, match="not a kvcake segment socket"):
        MappedSegment(forged)
    assert victim.read_bytes() == b"\0" * SIZE


def test_another_segment_of_the_owner_is_not_handed_for_a_name(owner: TransferEngine) -> None:
    owner.register_segment("kv1", SIZE)
    other = owner.local_descriptor("kv1")
    forged = msgspec.structs.replace(owner.local_descriptor("kv0"),
                                     segment_id=other.segment_id, shm_inode=other.shm_inode)
    with pytest.raises(HandoverRefusedError, match="not the one described"):
        MappedSegment(forged)


def test_with_a_token_only_token_holders_get_the_memfd() -> None:
    auth = ClusterAuth("s3cret")
    with TransferEngine(TransferConfig(), auth=auth) as engine:
        engine.register_segment("kv0", SIZE)
        descriptor = engine.local_descriptor("kv0")
        with pytest.raises(HandoverRefusedError, match="requires the cluster token"):
            MappedSegment(descriptor)
        with pytest.raises(HandoverRefusedError, match="cluster token"):
            MappedSegment(descriptor, ClusterAuth("wrong"))
        mapped = MappedSegment(descriptor, auth)
        mapped.close()


_OWNER = """
import sys, msgspec
from kvcake.transfer.config import TransferConfig
from kvcake.transfer.engine import TransferEngine
engine = TransferEngine(TransferConfig())
engine.register_segment("pool", 1 << 16)
sys.stdout.buffer.write(msgspec.json.encode(engine.local_descriptor("pool")) + b"\\n")
sys.stdout.flush()
sys.stdin.read()
"""


def test_writes_into_a_killed_owners_pages_are_refused(peer: TransferEngine) -> None:
    with subprocess.Popen([sys.executable, "-c", _OWNER], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE) as child:
        _write_after_kill(child, peer)


def _write_after_kill(child: subprocess.Popen[bytes], peer: TransferEngine) -> None:
    try:
        assert child.stdout is not None
        descriptor = msgspec.json.decode(child.stdout.readline(), type=SegmentDescriptor)
        remote = peer.attach(descriptor)
        assert remote.transport == "shm"
        peer.write(remote, 0, memoryview(b"before"))
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        request = TransferRequest(TransferOp.WRITE, remote, 0, memoryview(b"after"))
        with pytest.raises(TransferError, match="exited"):
            peer.transfer([request])
        with pytest.raises(KvcakeError):  # the dead owner's mapping is not used again
            peer.transfer([request])
    finally:
        child.kill()
        child.wait()


_DUMPABLE = """
import ctypes, sys
from kvcake.common.auth import ClusterAuth
from kvcake.transfer.config import TransferConfig
from kvcake.transfer.engine import TransferEngine
libc = ctypes.CDLL(None)
before = libc.prctl(3, 0, 0, 0, 0)  # PR_GET_DUMPABLE
with TransferEngine(TransferConfig(), auth=ClusterAuth(sys.argv[1])):
    print(before, libc.prctl(3, 0, 0, 0, 0))
"""


@pytest.mark.parametrize(("token", "expected"), [("", "1 1"), ("s3cret", "1 0")])
def test_with_a_token_the_process_is_not_dumpable(token: str, expected: str) -> None:
    """Non-dumpable: same-user processes cannot open /proc/<pid>/fd/<memfd> around the
    handover."""
    out = subprocess.run([sys.executable, "-c", _DUMPABLE, token], capture_output=True,
                         text=True, check=True, timeout=60).stdout
    assert out.split() == expected.split()
