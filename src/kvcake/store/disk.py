"""A node's SSD tier: objects the master evicts from DRAM, kept as files, and read back.

The master decides (:class:`kvcake.store.service.OffloadTask` and friends); the node only
copies between its segment and ``DIR/<sha256(key)>``. File I/O runs in a worker thread so
the node keeps serving transfers meanwhile. A restarted node starts with an empty directory,
as it starts with an empty segment.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

from kvcake.common import codec
from kvcake.common.errors import ErrorCode, InvalidParamsError
from kvcake.common.log import get_logger
from kvcake.store import messages as m
from kvcake.transfer.service import check_range

log = get_logger(__name__)
_SUFFIX = ".kv"


class DiskTier:
    def __init__(self, directory: str, segment: memoryview) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob(f"*{_SUFFIX}"):
            stale.unlink()
        self._segment = segment

    def path(self, key: str) -> Path:
        return self.directory / (hashlib.sha256(key.encode()).hexdigest() + _SUFFIX)

    async def handle(self, payload: memoryview) -> bytes:
        request: m.NodeRequest = codec.decode(payload, m.NodeRequest)  # type: ignore[arg-type]
        try:
            await asyncio.to_thread(self._apply, request)
        except OSError as exc:
            log.warning("disk tier %s of %r failed: %s", type(request).__name__,
                        request.key, exc)
            return codec.encode(m.CodesReply([int(ErrorCode.FILE_WRITE_FAIL)]))
        return codec.encode(m.CodesReply([0]))

    def _apply(self, request: m.OffloadRequest | m.PromoteRequest | m.DropDiskRequest) -> None:
        if isinstance(request, m.DropDiskRequest):
            self.path(request.key).unlink(missing_ok=True)
            return
        check_range("disk tier segment", self._segment.nbytes, request.offset, request.size)
        window = self._segment[request.offset : request.offset + request.size]
        if isinstance(request, m.OffloadRequest):
            self._write(self.path(request.key), window)
        else:
            self._read(self.path(request.key), window)

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
