"""A node's SSD tier: objects the master evicts from DRAM, kept as files, and read back.

The master decides (:class:`kvcake.store.master.tiering.OffloadTask` and friends); the node
only copies between its segment and ``DIR/<sha256(key)>.kv``. File I/O runs in a worker
thread so the node keeps serving transfers meanwhile. A restarted node starts with an empty
tier, as it starts with an empty segment.

It never deletes a file it did not write: ``DIR/kvcake-disk-tier.manifest`` lists every
file the tier created (a name is added before its file exists, so a crash leaves nothing
unlisted). At start the listed files are deleted, and a directory holding ``*.kv`` files the
manifest does not list is refused, with nothing touched. The manifest is held under an
exclusive ``flock``: one node per directory. A tier larger than the free space of its
directory's file system (after that clean-up) is refused at start.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import re
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from kvcake.common.config import format_size
from kvcake.common.errors import ErrorCode, InvalidParamsError, KvcakeError
from kvcake.common.log import get_logger
from kvcake.common.rpc import Dispatcher
from kvcake.transfer.service import check_range
from kvcake.wire import store as m

log = get_logger(__name__)
_SUFFIX = ".kv"
MANIFEST = "kvcake-disk-tier.manifest"
_OWN_NAME = re.compile(r"[0-9a-f]{64}\.kv")  # the only names a tier writes (or deletes)


class _Manifest:
    """The names of the files the tier wrote, one a line, under an exclusive flock."""

    def __init__(self, directory: Path) -> None:
        self._file: IO[str] = open(directory / MANIFEST, "a+", encoding="utf-8")  # noqa: SIM115
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise InvalidParamsError(f"--disk-dir {directory} is in use by another node's "
                                     "disk tier") from None
        self._file.seek(0)
        self.names = {n for n in self._file.read().split() if _OWN_NAME.fullmatch(n)}
        self._lock = threading.Lock()  # offloads run in several worker threads

    def add(self, name: str) -> None:
        with self._lock:
            if name not in self.names:
                self._file.write(name + "\n")
                self._file.flush()
                self.names.add(name)

    def clear(self) -> None:
        with self._lock:
            self._file.truncate(0)
            self.names.clear()

    def close(self) -> None:
        self._file.close()  # releases the flock


class DiskTier:
    """Raises InvalidParamsError when ``directory`` holds ``*.kv`` files this tier did not
    write, or another node's tier uses it."""

    def __init__(self, directory: str, segment: memoryview, capacity: int = 0) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._manifest = _Manifest(self.directory)
        try:
            self._delete_own_files()
            self._check_room(capacity)
        except BaseException:
            self._manifest.close()
            raise
        self._segment = segment

    def _delete_own_files(self) -> None:
        """What the last run left; refuse, deleting nothing, if another program's are there."""
        foreign = sorted(p.name for p in self.directory.glob(f"*{_SUFFIX}")
                         if p.name not in self._manifest.names)
        if foreign:
            raise InvalidParamsError(
                f"--disk-dir {self.directory} holds {len(foreign)} *{_SUFFIX} file(s) the "
                f"disk tier did not write ({', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}); give it a directory of its own")
        for name in self._manifest.names:
            (self.directory / name).unlink(missing_ok=True)
            (self.directory / name).with_suffix(".partial").unlink(missing_ok=True)
        self._manifest.clear()

    def _check_room(self, capacity: int) -> None:
        free = shutil.disk_usage(self.directory).free
        if capacity > free:
            raise InvalidParamsError(
                f"a disk tier of {format_size(capacity)} does not fit in --disk-dir "
                f"{self.directory}: its file system has {format_size(free)} free; give a "
                f"smaller --disk-capacity or another directory")

    def close(self) -> None:
        self._manifest.close()

    def path(self, key: str) -> Path:
        return self.directory / (hashlib.sha256(key.encode()).hexdigest() + _SUFFIX)

    async def offload(self, request: m.OffloadRequest) -> m.CodesReply:
        """Copy an object's bytes from the segment into its file (listed before it exists)."""
        def write() -> None:
            path = self.path(request.key)
            self._manifest.add(path.name)
            self._write(path, self._window(request.offset, request.size))
        return await self._off_loop(request, write)

    async def promote(self, request: m.PromoteRequest) -> m.CodesReply:
        """Copy an object's file back into the segment."""
        return await self._off_loop(request, lambda: self._read(
            self.path(request.key), self._window(request.offset, request.size)))

    async def drop(self, request: m.DropDiskRequest) -> m.CodesReply:
        return await self._off_loop(request, self.path(request.key).unlink, True)

    def _window(self, offset: int, size: int) -> memoryview:
        check_range("disk tier segment", self._segment.nbytes, offset, size)
        return self._segment[offset : offset + size]

    @staticmethod
    async def _off_loop(request: m.OffloadRequest | m.PromoteRequest | m.DropDiskRequest,
                        work: Callable[..., None],
                        *args: object) -> m.CodesReply:
        """``work(*args)`` off the event loop; a disk failure is a code, never a dead call."""
        try:
            await asyncio.to_thread(work, *args)
        except OSError as exc:
            log.warning("disk tier %s of %r failed: %s", type(request).__name__,
                        request.key, exc)
            return m.CodesReply([int(ErrorCode.FILE_WRITE_FAIL)])
        return m.CodesReply([0])

    @staticmethod
    def _write(path: Path, window: memoryview) -> None:
        partial = path.with_suffix(".partial")
        with open(partial, "wb") as file:
            file.write(window)
        os.replace(partial, path)

    @staticmethod
    def _read(path: Path, window: memoryview) -> None:
        with open(path, "rb") as file:
            if os.fstat(file.fileno()).st_size != window.nbytes:
                raise InvalidParamsError(f"{path.name} does not hold {window.nbytes} bytes")
            if file.readinto(window) != window.nbytes:
                raise OSError(f"short read from {path}")


def control_channel(tier: DiskTier | None,
                    info: Callable[[], m.NodeInfoReply] | None = None) -> Dispatcher:
    """The node's control RPC: a handler per request type (disk tasks refused without a
    disk tier, ``NodeInfo`` without ``info``)."""
    disk: dict[type[Any], Callable[[Any], Any]] = {
        m.OffloadRequest: tier.offload, m.PromoteRequest: tier.promote,
        m.DropDiskRequest: tier.drop} if tier is not None else dict.fromkeys(
        (m.OffloadRequest, m.PromoteRequest, m.DropDiskRequest), _refuse("no disk tier"))
    about = _refuse("nothing to tell") if info is None else lambda _: info()
    return Dispatcher(m.NodeRequest, {**disk, m.NodeInfo: about})


def _refuse(why: str) -> Callable[[Any], Any]:
    def refuse(_: Any) -> Any:
        raise KvcakeError(f"this node has {why}", ErrorCode.UNAVAILABLE_IN_CURRENT_MODE)
    return refuse
