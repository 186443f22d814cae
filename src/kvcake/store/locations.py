"""Where each complete object lies, published by the master in shared memory for the clients
of its host: a get or ``is_exist`` of a key found there is a lookup and a copy, with no
master round trip.

The master (:class:`LocationTable`, the only writer) keeps one 64-byte slot per object in a
file under ``/dev/shm``: an open-addressed table keyed by a 128-bit hash of the object key
(tenant-scoped), each slot guarded by its own sequence number::

    slot   seq  key hash (16 B)  state  segment_id  offset  size  spare
           odd while the master rewrites it; +2 for every change

A client (:class:`LocationReader`) reads a slot's sequence, its fields, then the object's
bytes through its mapping of the segment, and trusts the bytes only if the sequence is still
the same (:meth:`LocationReader.unchanged`). The master drops a slot before the object's
memory can be freed or reused, in the same call that changes the object, so a copy that
overlapped a reuse sees another sequence and is read again through the master. A miss is
never an answer either: the caller asks the master (a put whose ``PutEnd`` is still on its
way, for one, is found there).

The master holds an exclusive ``flock`` on the file while it lives; a reader that can take a
shared one knows the master is gone and stops using it. Only a master that keeps no journal
publishes (:class:`kvcake.store.master.server.MasterServer`): a leader that lost its term
would otherwise go on answering through the table.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import mmap
import os
import struct
import tempfile
import uuid
import weakref
from dataclasses import dataclass

from kvcake.common.errors import InvalidParamsError
from kvcake.transfer.segment import local_host_id

MAGIC = b"KVCKLOC1"
_HEADER = struct.Struct("<8sQ")  # magic, slots
_HEADER_BYTES = 4096
_SEQ = struct.Struct("<Q")
_FIELDS = struct.Struct("<16sQQQQ")  # key hash, state, segment_id, offset, size
SLOT_BYTES = 64
MAX_PROBES = 16
NO_SEGMENT = 2**64 - 1  # the object has no memory replica a client of this host maps

EMPTY, LIVE, DROPPED = 0, 1, 2
_PREFIX = "kvcake-locations-"


def key_hash(object_key: str) -> bytes:
    """(A key that is not valid UTF-8 hashes too; it is found nowhere, and the call, going
    to ask the master instead, refuses it by name: :func:`kvcake.store.pieces.check_keys`.)"""
    return hashlib.blake2b(object_key.encode(errors="surrogatepass"), digest_size=16).digest()


def _first_slot(digest: bytes, mask: int) -> int:
    return int.from_bytes(digest[:8], "little") & mask


def _slot_base(slot: int) -> int:
    return _HEADER_BYTES + slot * SLOT_BYTES


def shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


@dataclass(frozen=True)
class Location:
    """A key's slot as read: its sequence then, and where the object lies."""

    slot: int
    seq: int
    segment_id: int
    offset: int
    size: int

    @property
    def mapped_here(self) -> bool:
        return self.segment_id != NO_SEGMENT


class LocationTable:
    """The master's side: publish and drop object keys. ``slots``: a power of two;
    ``host_id``: the host whose processes may read it (this one's)."""

    def __init__(self, slots: int, directory: str = "") -> None:
        self.host_id = local_host_id()
        if slots <= 0 or slots & (slots - 1):
            raise InvalidParamsError(f"location slots must be a power of two, got {slots}")
        directory = directory or shm_dir()
        remove_orphans(directory)
        self.path = os.path.join(directory, f"{_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}")
        self._mask = slots - 1
        self._fd, self._map = create_held(self.path, _HEADER_BYTES + slots * SLOT_BYTES)
        _HEADER.pack_into(self._map, 0, MAGIC, slots)
        self._slot_of: dict[bytes, int] = {}
        self.unplaced = 0  # keys left out: every slot of their probe run held another key

    def publish(self, object_key: str, segment_id: int, offset: int, size: int) -> None:
        digest = key_hash(object_key)
        slot = self._slot_of.get(digest)
        if slot is None:
            slot = self._free_slot(digest)
            if slot is None:
                self.unplaced += 1
                return
            self._slot_of[digest] = slot
        self._write(slot, digest, LIVE, segment_id, offset, size)

    def drop(self, object_key: str) -> None:
        slot = self._slot_of.pop(key_hash(object_key), None)
        if slot is not None:
            self._write(slot, bytes(16), DROPPED, 0, 0, 0)

    def __len__(self) -> int:
        return len(self._slot_of)

    def _free_slot(self, digest: bytes) -> int | None:
        """The first slot of ``digest``'s probe run that holds no key."""
        first = _first_slot(digest, self._mask)
        for probe in range(MAX_PROBES):
            slot = (first + probe) & self._mask
            if _FIELDS.unpack_from(self._map, _slot_base(slot) + _SEQ.size)[1] != LIVE:
                return slot
        return None

    def _write(self, slot: int, digest: bytes, state: int, segment_id: int, offset: int,
               size: int) -> None:
        base = _slot_base(slot)
        seq = _SEQ.unpack_from(self._map, base)[0]
        _SEQ.pack_into(self._map, base, seq + 1)  # readers of this slot retry or ask
        _FIELDS.pack_into(self._map, base + _SEQ.size, digest, state, segment_id, offset, size)
        _SEQ.pack_into(self._map, base, seq + 2)

    def close(self) -> None:
        """Remove the table; its readers stop using it (idempotent)."""
        remove_held(self.path, self._fd, self._map)


def create_held(path: str, size: int) -> tuple[int, mmap.mmap]:
    """A new file of ``size`` zero bytes at ``path`` (mode 0600), mapped and touched, with an
    exclusive ``flock`` held on it for as long as its descriptor is open. Its space is
    reserved first: a full ``/dev/shm`` raises ``OSError`` here, not ``SIGBUS`` at a touch."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.posix_fallocate(fd, 0, size)
        mapping = mmap.mmap(fd, size)
    except OSError:
        os.close(fd)
        os.unlink(path)
        raise
    mapping.write(bytes(size))  # fresh memory is slow to touch the first time
    return fd, mapping


def remove_held(path: str, fd: int, mapping: mmap.mmap) -> None:
    """Remove a file :func:`create_held` made; its lock goes with it (idempotent)."""
    if mapping.closed:
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    mapping.close()
    os.close(fd)


def still_held(fd: int) -> bool:
    """Whether the process that made the file of ``fd`` still holds its lock (lives)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def remove_orphans(directory: str) -> None:
    """Delete tables whose master is gone (it died without closing its table)."""
    for path in glob.glob(os.path.join(directory, f"{_PREFIX}*")):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(path)
        except OSError:
            pass  # its master lives (or someone else removed it)
        finally:
            os.close(fd)


class LocationReader:
    """A client's side: find keys; raises ``OSError`` when ``path`` cannot be read."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY)
        try:
            self._map = mmap.mmap(self._fd, 0, prot=mmap.PROT_READ)
            magic, slots = _HEADER.unpack_from(self._map, 0)
            if magic != MAGIC or len(self._map) != _HEADER_BYTES + slots * SLOT_BYTES:
                raise OSError(f"{path} is not a kvcake location table")
        except (OSError, ValueError, struct.error):
            os.close(self._fd)
            raise
        self._mask = slots - 1
        self.close = weakref.finalize(self, _release, self._map, self._fd)  # or when unused

    def alive(self) -> bool:
        """Whether the master that writes the table still holds it."""
        return still_held(self._fd)

    def find(self, object_key: str) -> Location | None:
        """``object_key``'s slot as it is now; ``None``: not found (ask the master)."""
        digest = key_hash(object_key)
        first = _first_slot(digest, self._mask)
        for probe in range(MAX_PROBES):
            slot = (first + probe) & self._mask
            base = _slot_base(slot)
            seq = _SEQ.unpack_from(self._map, base)[0]
            found, state, segment_id, offset, size = _FIELDS.unpack_from(
                self._map, base + _SEQ.size)
            if seq & 1 or _SEQ.unpack_from(self._map, base)[0] != seq:
                return None  # being rewritten
            if state == EMPTY:
                return None
            if state == LIVE and found == digest:
                return Location(slot, seq, segment_id, offset, size)
        return None

    def unchanged(self, location: Location) -> bool:
        """Whether ``location``'s slot is as it was when found: bytes read meanwhile hold."""
        seq: int = _SEQ.unpack_from(self._map, _slot_base(location.slot))[0]
        return seq == location.seq



def _release(table: mmap.mmap, fd: int) -> None:
    table.close()
    os.close(fd)
