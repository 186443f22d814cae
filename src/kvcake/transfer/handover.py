"""Same-host segment sharing that the kernel vouches for: memfds handed over a Unix socket.

A peer never opens a path it was told about. The owner of a segment listens on an abstract
Unix socket (no file, scoped to its network namespace); a peer that wants to map the segment
connects, checks with ``SO_PEERCRED`` that the listener is the process the descriptor names,
and asks for the segment by name, id, inode and *registrant* (who published it: ``""`` for the
metadata directory, ``store:<client>`` for a master, ``instance:<id>`` for a Conductor). The
owner answers with the memfd itself (``SCM_RIGHTS``) only for a segment of its own that it
bound to that registrant; anything else is a refusal naming the reason::

    peer                                               owner (thread of the TransferEngine)
      |-- connect \\0kvcake-seg/<pid>/<random> -------->|   SO_PEERCRED: pid == owner_pid?
      |-- Hello(nonce) / <- Challenge / -- Proof ----->|   only with a cluster token
      |-- FdRequest(name, id, inode, registrant) ----->|
      |<- FdReply(ok) + the memfd, or FdReply(error) --|   a pidfd of the owner is kept

The pidfd taken at the handover tells, without a round trip, whether the owner still lives:
bytes written into a dead owner's pages are refused instead of acknowledged.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import select
import socket
import stat
import struct
import threading
from collections.abc import Callable

import msgspec

from kvcake.common import codec
from kvcake.common.auth import NO_AUTH, ClientHandshake, ClusterAuth, ServerHandshake
from kvcake.common.errors import AuthenticationError, ErrorCode, KvcakeError
from kvcake.common.log import get_logger

log = get_logger(__name__)

MAX_MESSAGE = 1024
HANDOVER_TIMEOUT_S = 2.0  # an owner answers at once; a silent one is not an owner
MEMFD_PREFIX = "/memfd:kvcake:"
_PEERCRED = struct.Struct("3i")  # pid, uid, gid
_PR_SET_DUMPABLE = 4


class Hello(msgspec.Struct, tag=True):
    nonce: bytes


class Challenge(msgspec.Struct, tag=True):
    payload: bytes


class Proof(msgspec.Struct, tag=True):
    mac: bytes


class FdRequest(msgspec.Struct, tag=True):
    name: str
    segment_id: int
    inode: int
    registrant: str


class FdReply(msgspec.Struct, tag=True):
    error: str = ""  # empty: the memfd rides along


HandoverMessage = Hello | Challenge | Proof | FdRequest | FdReply


class HandoverRefusedError(KvcakeError):
    """The listener is not the segment's owner, or the owner would not hand it over."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ErrorCode.ACCESS_DENIED)


def new_socket_name() -> str:
    """An abstract socket name for this process (no NUL; never a filesystem path)."""
    return f"kvcake-seg/{os.getpid()}/{secrets.token_hex(8)}"


def check_socket_name(name: str) -> bytes:
    if not name.startswith("kvcake-seg/") or len(name) > 100 or not name.isprintable():
        raise HandoverRefusedError(f"{name!r} is not a kvcake segment socket")
    return b"\0" + name.encode()


class OwnerProcess:
    """A pidfd: whether the process that handed a segment over still lives."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.fd = os.pidfd_open(pid)
        # asked after every copy: one epoll kept (any thread may wait on it at once)
        self._exits = select.epoll()
        self._exits.register(self.fd, select.EPOLLIN)

    def alive(self) -> bool:
        if self.fd < 0:
            return False
        try:
            return not self._exits.poll(0)  # a pidfd turns readable when its process exits
        except ValueError:  # closed meanwhile
            return False

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            self._exits.close()
            os.close(fd)


def forbid_same_user_access() -> None:
    """Make this process non-dumpable: other processes of the same (non-root) user can then
    neither ptrace it nor open ``/proc/<pid>/fd/<memfd>``; only a handover reaches its
    segments. Root still can. Set by a transfer engine that runs with a cluster token."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        log.warning("could not make the process non-dumpable: %s",
                    os.strerror(ctypes.get_errno()))


# ----- the owner's side
Lookup = Callable[[FdRequest], int]  # the memfd to hand over; raises with the reason


class HandoverServer:
    """One per transfer engine: hands this process's memfds to peers that ask correctly."""

    def __init__(self, lookup: Lookup, auth: ClusterAuth = NO_AUTH) -> None:
        self.name = new_socket_name()
        self._lookup = lookup
        self._auth = auth
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self._listener.bind(check_socket_name(self.name))
        self._listener.listen(64)
        self._thread = threading.Thread(target=self._serve, name="kvcake-handover", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            with conn:
                conn.settimeout(HANDOVER_TIMEOUT_S)
                with contextlib.suppress(OSError, KvcakeError):
                    self._answer(conn)

    def _answer(self, conn: socket.socket) -> None:
        message = _receive(conn)
        if self._auth.enabled:
            if not isinstance(message, Hello):
                _send(conn, FdReply("this segment's owner requires the cluster token"))
                return
            handshake = ServerHandshake(self._auth)
            _send(conn, Challenge(handshake.hello(message.nonce)))
            proof = _receive(conn)
            try:
                handshake.proof(proof.mac if isinstance(proof, Proof) else b"")
            except AuthenticationError as exc:
                _send(conn, FdReply(str(exc)))
                return
            message = _receive(conn)
        if not isinstance(message, FdRequest):
            _send(conn, FdReply(f"expected a segment request, got {type(message).__name__}"))
            return
        self._hand_over(conn, message)

    def _hand_over(self, conn: socket.socket, request: FdRequest) -> None:
        try:
            fd = self._lookup(request)
        except KvcakeError as exc:
            _send(conn, FdReply(str(exc.args[0])))
            return
        socket.send_fds(conn, [codec.encode(FdReply())], [fd])

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept()
        self._listener.close()
        self._thread.join(HANDOVER_TIMEOUT_S + 1)


# ----- the peer's side
class Handover:
    """A segment's memfd received from its owner, with the owner's pidfd."""

    def __init__(self, fd: int, owner: OwnerProcess) -> None:
        self.fd = fd
        self.owner = owner

    def close_fd(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def receive(socket_name: str, owner_pid: int, request: FdRequest, size: int,
            auth: ClusterAuth = NO_AUTH, timeout_s: float = HANDOVER_TIMEOUT_S) -> Handover:
    """Ask the owner ``owner_pid`` listening on ``socket_name`` for a segment's memfd.

    Raises :class:`HandoverRefusedError` unless the listener is ``owner_pid`` and hands over a
    kvcake memfd with the requested inode and at least ``size`` bytes.
    """
    address = check_socket_name(socket_name)
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as conn:
        conn.settimeout(timeout_s)
        try:
            conn.connect(address)
            owner = _verified_owner(conn, owner_pid)
        except OSError as exc:
            raise HandoverRefusedError(f"no owner listening at {socket_name!r}: {exc}") from exc
        try:
            fd = _exchange(conn, request, auth)
            _check_memfd(fd, request, size)
        except BaseException:
            owner.close()
            raise
        return Handover(fd, owner)


def _verified_owner(conn: socket.socket, owner_pid: int) -> OwnerProcess:
    pid, _, _ = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                 _PEERCRED.size))
    if pid != owner_pid or owner_pid <= 0:
        raise HandoverRefusedError(f"the socket is held by pid {pid}, not by the segment's "
                              f"owner pid {owner_pid}")
    # taken while the owner holds the connection open, so it is that very process
    return OwnerProcess(pid)


def _exchange(conn: socket.socket, request: FdRequest, auth: ClusterAuth) -> int:
    try:
        if auth.enabled:
            handshake = ClientHandshake(auth)
            _send(conn, Hello(handshake.hello()))
            challenge = _receive(conn)
            if not isinstance(challenge, Challenge):
                raise HandoverRefusedError(_refusal_text(challenge, "a challenge"))
            _send(conn, Proof(handshake.proof(challenge.payload)))
        _send(conn, request)
        data, fds, _, _ = socket.recv_fds(conn, MAX_MESSAGE, 1)
    except AuthenticationError as exc:
        raise HandoverRefusedError(f"cluster token: {exc.args[0]}") from exc
    except OSError as exc:
        raise HandoverRefusedError(f"the segment's owner did not answer: {exc}") from exc
    reply: HandoverMessage = codec.decode(data, HandoverMessage)  # type: ignore[arg-type]
    if not isinstance(reply, FdReply) or reply.error or len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise HandoverRefusedError(_refusal_text(reply, "the segment"))
    return fds[0]


def _refusal_text(reply: object, wanted: str) -> str:
    if isinstance(reply, FdReply) and reply.error:
        return f"the owner refused: {reply.error}"
    return f"the owner sent {type(reply).__name__} instead of {wanted}"


def _check_memfd(fd: int, request: FdRequest, size: int) -> None:
    try:
        info = os.fstat(fd)
        target = os.readlink(f"/proc/self/fd/{fd}")
        if not stat.S_ISREG(info.st_mode) or not target.startswith(MEMFD_PREFIX):
            raise HandoverRefusedError(f"segment {request.name!r}: the owner sent {target!r}, "
                                  "not a kvcake memfd")
        if info.st_ino != request.inode or info.st_size < size:
            raise HandoverRefusedError(f"segment {request.name!r}: the memfd is not the one "
                                  "described (inode or size differ)")
    except BaseException:
        os.close(fd)
        raise


def _send(conn: socket.socket, message: msgspec.Struct) -> None:
    conn.send(codec.encode(message))


def _receive(conn: socket.socket) -> HandoverMessage:
    data = conn.recv(MAX_MESSAGE)
    if not data:
        raise HandoverRefusedError("the connection closed before a message")
    return codec.decode(data, HandoverMessage)  # type: ignore[arg-type]
