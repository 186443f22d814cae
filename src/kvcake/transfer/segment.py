"""Segments: registered memory regions that peers read and write.

A segment is a ``memfd`` mapped into its owner. Peers on the same host map the very same
pages (no server on the data path) once the owner handed them the memfd over a Unix socket
(:mod:`kvcake.transfer.handover`): no process ever opens a path it was told about. Peers
elsewhere reach it through the owner's TCP server. A memfd has no name in ``/dev/shm``, so
nothing leaks when the owner dies: the pages go away with the last mapping.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Callable
from functools import cache

import msgspec

from kvcake.common.auth import NO_AUTH, ClusterAuth
from kvcake.common.errors import ErrorCode, InvalidParamsError, KvcakeError, SegmentNotFoundError
from kvcake.transfer.handover import FdRequest, HandoverRefusedError, OwnerProcess, receive

_MAX_NAME = 200


class SegmentDescriptor(msgspec.Struct, frozen=True):
    """What a peer needs to reach a segment; published through the metadata directory.

    endpoint: ``host:port`` of the owner's TCP server.
    host_id: the owner's host identity; a peer with the same id may ask ``shm_socket``.
    shm_socket: the owner's abstract handover socket (``""``: no same-host mapping).
    shm_inode: inode of the memfd, checked when it is handed over.
    owner_pid: the process that must hold ``shm_socket`` (checked with ``SO_PEERCRED``).
    registrant: who published it (``""`` the directory, ``store:<client>`` a master,
      ``instance:<id>`` a Conductor); the owner hands the memfd over only for a registrant
      it bound the segment to, so nobody can republish another process's segment.
    """

    name: str
    segment_id: int
    size: int
    host_id: str
    endpoint: str
    shm_socket: str
    shm_inode: int
    owner_pid: int = 0
    registrant: str = ""


@cache
def local_host_id() -> str:
    """This host's identity: kernel boot id plus network namespace.

    Two processes with the same id share memory *and* a network stack; processes in
    different network namespaces (test "hosts") get different ids, so they talk TCP.
    """
    with open("/proc/sys/kernel/random/boot_id") as f:
        boot_id = f.read().strip()
    netns = os.stat("/proc/self/ns/net").st_ino
    return f"{boot_id}/net:{netns}"


def store_registrant(client_id: str) -> str:
    """How a store's master publishes the segments a client mounted."""
    return f"store:{client_id}"


def instance_registrant(instance_id: str) -> str:
    """How a Conductor publishes an instance's KV cache to the instances that write it."""
    return f"instance:{instance_id}"


def check_segment_name(name: str) -> str:
    if not name or len(name) > _MAX_NAME or "/" in name or not name.isprintable():
        raise InvalidParamsError(
            f"segment name must be 1..{_MAX_NAME} printable characters without '/', got {name!r}"
        )
    return name


def private_buffer(size: int) -> mmap.mmap:
    """``size`` bytes of this process's own memory, pre-faulted and page-aligned like a
    segment. Not a ``bytearray``: its data starts 16 bytes into its page, and a copy whose
    destination lies 1-31 bytes past its source modulo 4 KiB runs ten times slower on some
    CPUs (4K aliasing: 64 KiB copies at 2.3-2.9 GB/s against 30 GB/s on an AMD EPYC)."""
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)


def _map(fd: int, size: int, populate: bool) -> mmap.mmap:
    flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0)
    return mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)


class Segment:
    """A memory region owned by this process, backed by a memfd, readable by peers."""

    def __init__(self, name: str, segment_id: int, size: int, pretouch: bool = True) -> None:
        if size <= 0:
            raise InvalidParamsError(f"segment size must be > 0 bytes, got {size}")
        self.name = check_segment_name(name)
        self.segment_id = segment_id
        self.size = size
        self.fd = os.memfd_create(f"kvcake:{name}", os.MFD_CLOEXEC)
        try:
            self._mmap = self._allocate(pretouch)
        except BaseException:
            os.close(self.fd)
            raise
        self.view = memoryview(self._mmap)
        self.inode = os.fstat(self.fd).st_ino
        self.registrants: set[str] = {""}  # who may publish it: see SegmentDescriptor

    def _allocate(self, pretouch: bool) -> mmap.mmap:
        if pretouch:
            # Fresh VM memory is slow to touch the first time: pay for it now, not
            # inside the first transfers.
            os.posix_fallocate(self.fd, 0, self.size)
        else:
            os.ftruncate(self.fd, self.size)
        return _map(self.fd, self.size, populate=pretouch)

    def descriptor(self, host_id: str, endpoint: str, shm_socket: str,
                   registrant: str = "") -> SegmentDescriptor:
        return SegmentDescriptor(
            name=self.name,
            segment_id=self.segment_id,
            size=self.size,
            host_id=host_id,
            endpoint=endpoint,
            shm_socket=shm_socket,
            shm_inode=self.inode,
            owner_pid=os.getpid(),
            registrant=registrant,
        )

    def hand_over(self, request: FdRequest) -> int:
        """The memfd, for a peer asking for exactly this segment on behalf of a registrant
        it was bound to; raises with the reason otherwise."""
        if (request.segment_id, request.inode) != (self.segment_id, self.inode):
            raise HandoverRefusedError(f"segment {self.name!r} is not the one described")
        if request.registrant not in self.registrants:
            raise HandoverRefusedError(f"segment {self.name!r} was not published by "
                                  f"{request.registrant or 'the directory'!r}")
        if self.fd < 0:
            raise SegmentNotFoundError(f"segment {self.name!r} is closed")
        return self.fd

    def close(self) -> None:
        """Unmap and free; a peer that mapped it keeps its pages until it unmaps too."""
        if self.fd < 0:
            return
        self.view.release()
        with contextlib.suppress(BufferError):  # a caller still holds a slice: the mapping
            self._mmap.close()  # goes when that slice is collected
        os.close(self.fd)
        self.fd = -1

    def __repr__(self) -> str:
        return f"Segment(name={self.name!r}, id={self.segment_id}, size={self.size})"


def offers_local_mapping(descriptor: SegmentDescriptor, host_id: str = "") -> bool:
    """Whether ``descriptor`` offers a same-host mapping to a process on ``host_id`` (this
    host by default): the case in which its owner can be asked to prove it."""
    return bool(descriptor.shm_socket) and descriptor.host_id == (host_id or local_host_id())


def prove_ownership(descriptor: SegmentDescriptor, auth: ClusterAuth = NO_AUTH
                    ) -> OwnerProcess:
    """The owner's pidfd, once the owner handed the segment over for its registrant; else
    ``ACCESS_DENIED`` naming why (a Conductor or master checking a same-host descriptor)."""
    request = FdRequest(descriptor.name, descriptor.segment_id, descriptor.shm_inode,
                        descriptor.registrant)
    try:
        handover = receive(descriptor.shm_socket, descriptor.owner_pid, request,
                           descriptor.size, auth)
    except KvcakeError as exc:
        raise KvcakeError(f"segment {descriptor.name!r} refused: its owner did not prove "
                          f"it publishes it as {descriptor.registrant!r} ({exc.args[0]})",
                          ErrorCode.ACCESS_DENIED) from exc
    handover.close_fd()  # the checker maps nothing; it keeps the owner's pidfd
    return handover.owner


class MappedSegment:
    """A same-host peer's segment mapped into this process, from the memfd its owner handed
    over; ``owner_alive()`` says whether that owner still lives."""

    def __init__(self, descriptor: SegmentDescriptor, auth: ClusterAuth = NO_AUTH) -> None:
        self.descriptor = descriptor
        if not descriptor.shm_socket:
            raise HandoverRefusedError(f"segment {descriptor.name!r} offers no same-host mapping")
        request = FdRequest(descriptor.name, descriptor.segment_id, descriptor.shm_inode,
                            descriptor.registrant)
        handover = receive(descriptor.shm_socket, descriptor.owner_pid, request,
                           descriptor.size, auth)
        try:
            # populated: the pages are the owner's already; a copy then faults on none
            self._mmap = _map(handover.fd, descriptor.size, populate=True)
        except BaseException:
            handover.owner.close()
            raise
        finally:
            handover.close_fd()
        self.owner = handover.owner
        self.owner_alive: Callable[[], bool] = self.owner.alive  # asked after every copy
        self.view = memoryview(self._mmap)

    def close(self) -> None:
        self.view.release()
        with contextlib.suppress(BufferError):
            self._mmap.close()
        self.owner.close()
