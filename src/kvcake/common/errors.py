"""One exception tree for the whole project, keyed by Mooncake's error-code names.

Three tiers (see STYLE.md §11): ``assert`` for internal invariants, return values for
"not now" outcomes, and these exceptions for caller and remote faults. Every error carries
the Mooncake code (so a Mooncake user reads the same names) and an HTTP status hint that the
API layer uses verbatim.
"""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    """Mooncake's error codes, same names and values."""

    OK = 0
    INTERNAL_ERROR = -1
    BUFFER_OVERFLOW = -10
    SHARD_INDEX_OUT_OF_RANGE = -100
    SEGMENT_NOT_FOUND = -101
    SEGMENT_ALREADY_EXISTS = -102
    NO_AVAILABLE_HANDLE = -200
    INVALID_VERSION = -300
    INVALID_KEY = -400
    WRITE_FAIL = -500
    INVALID_PARAMS = -600
    ILLEGAL_CLIENT = -601
    INVALID_WRITE = -700
    INVALID_READ = -701
    INVALID_REPLICA = -702
    REPLICA_IS_NOT_READY = -703
    OBJECT_NOT_FOUND = -704
    OBJECT_ALREADY_EXISTS = -705
    OBJECT_HAS_LEASE = -706
    LEASE_EXPIRED = -707
    OBJECT_REPLICA_BUSY = -714
    TRANSFER_FAIL = -800
    RPC_FAIL = -900
    ETCD_OPERATION_ERROR = -1000
    ETCD_KEY_NOT_EXIST = -1001
    ETCD_TRANSACTION_FAIL = -1002
    ETCD_CTX_CANCELLED = -1003
    UNAVAILABLE_IN_CURRENT_STATUS = -1010
    UNAVAILABLE_IN_CURRENT_MODE = -1011
    FILE_NOT_FOUND = -1100
    FILE_OPEN_FAIL = -1101
    FILE_READ_FAIL = -1102
    FILE_WRITE_FAIL = -1103
    # kvcake's own, far below Mooncake's ranges: the Conductor turned a request away early
    # because serving it would break a latency objective (Mooncake's master has no such outcome)
    REQUEST_REJECTED = -9000
    # kvcake's own: a peer did not prove it holds the cluster token (Mooncake has no auth)
    UNAUTHENTICATED = -9100
    # kvcake's own: a READ/WRITE frame no valid grant of the segment's owner covers
    ACCESS_DENIED = -9101


# HTTP status a front end should answer with when this code reaches a client.
_STATUS_HINTS: dict[ErrorCode, int] = {
    ErrorCode.BUFFER_OVERFLOW: 400,
    ErrorCode.INVALID_PARAMS: 400,
    ErrorCode.INVALID_KEY: 400,
    ErrorCode.INVALID_WRITE: 400,
    ErrorCode.INVALID_READ: 400,
    ErrorCode.ILLEGAL_CLIENT: 403,
    ErrorCode.SEGMENT_NOT_FOUND: 404,
    ErrorCode.OBJECT_NOT_FOUND: 404,
    ErrorCode.ETCD_KEY_NOT_EXIST: 404,
    ErrorCode.FILE_NOT_FOUND: 404,
    ErrorCode.SEGMENT_ALREADY_EXISTS: 409,
    ErrorCode.OBJECT_ALREADY_EXISTS: 409,
    ErrorCode.OBJECT_HAS_LEASE: 409,
    ErrorCode.OBJECT_REPLICA_BUSY: 409,
    ErrorCode.LEASE_EXPIRED: 410,
    ErrorCode.REQUEST_REJECTED: 429,
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.ACCESS_DENIED: 403,
    ErrorCode.NO_AVAILABLE_HANDLE: 507,
    ErrorCode.REPLICA_IS_NOT_READY: 503,
    ErrorCode.UNAVAILABLE_IN_CURRENT_STATUS: 503,
    ErrorCode.UNAVAILABLE_IN_CURRENT_MODE: 503,
    ErrorCode.TRANSFER_FAIL: 502,
    ErrorCode.RPC_FAIL: 502,
    ErrorCode.ETCD_OPERATION_ERROR: 502,
}


def status_hint(code: ErrorCode) -> int:
    """The HTTP status that best describes ``code`` (500 when nothing more specific fits)."""
    return _STATUS_HINTS.get(code, 500)


class KvcakeError(Exception):
    """Root of every error kvcake raises on purpose.

    ``code`` is the Mooncake error code, ``status`` the HTTP status hint.
    """

    default_code: ErrorCode = ErrorCode.INTERNAL_ERROR

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.code: ErrorCode = code if code is not None else self.default_code

    @property
    def status(self) -> int:
        return status_hint(self.code)

    def __str__(self) -> str:
        return f"{self.code.name}: {self.args[0]}"


class InvalidParamsError(KvcakeError, ValueError):
    """The caller passed something malformed or out of range."""

    default_code = ErrorCode.INVALID_PARAMS


class SegmentNotFoundError(KvcakeError, LookupError):
    """No segment of that name is registered or published."""

    default_code = ErrorCode.SEGMENT_NOT_FOUND


class PermissionDeniedError(KvcakeError, PermissionError):
    """The caller may not act as who it says (a tenant's token is missing or wrong)."""

    default_code = ErrorCode.ILLEGAL_CLIENT


class TransferError(KvcakeError):
    """Bytes could not be moved: the peer died, hung past the timeout, or refused."""

    default_code = ErrorCode.TRANSFER_FAIL


class ProtocolError(KvcakeError):
    """A peer sent a frame that breaks the wire protocol."""

    default_code = ErrorCode.INVALID_PARAMS


class MetadataError(KvcakeError):
    """The metadata directory (etcd, a peer's handshake) could not be read or written."""

    default_code = ErrorCode.RPC_FAIL


class RequestRejectedError(KvcakeError):
    """Admission control turned the request away (HTTP 429): the system is too busy for it.

    ``reason`` is a short machine-readable tag (e.g. ``ttft_slo``), ``detail`` says why in words.
    """

    default_code = ErrorCode.REQUEST_REJECTED

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"rejected ({reason}): {detail}")
        self.reason = reason
        self.detail = detail


class AuthenticationError(KvcakeError):
    """A connection did not prove it holds the cluster token (or the peer did not)."""

    default_code = ErrorCode.UNAUTHENTICATED


class AccessDeniedError(KvcakeError):
    """A transfer server refused bytes no grant of the segment's owner covers."""

    default_code = ErrorCode.ACCESS_DENIED


def unreachable(exc: KvcakeError) -> bool:
    """Whether a call failed for want of an answer (the peer not reached, or silent past the
    call's timeout: ``RPC_FAIL``, see :class:`kvcake.common.rpc.RpcClient`) rather than by
    the peer's own refusal."""
    return exc.code is ErrorCode.RPC_FAIL


def error_from_code(code: int, message: str) -> KvcakeError:
    """Rebuild the most specific exception for a code received from a remote peer."""
    try:
        known = ErrorCode(code)
    except ValueError:
        return KvcakeError(f"unknown remote error code {code}: {message}")
    if known is ErrorCode.SEGMENT_NOT_FOUND:
        return SegmentNotFoundError(message, known)
    if known is ErrorCode.TRANSFER_FAIL:
        return TransferError(message, known)
    if known is ErrorCode.ILLEGAL_CLIENT:
        return PermissionDeniedError(message, known)
    if known is ErrorCode.UNAUTHENTICATED:
        return AuthenticationError(message, known)
    if known is ErrorCode.ACCESS_DENIED:
        return AccessDeniedError(message, known)
    if status_hint(known) == 400:
        return InvalidParamsError(message, known)
    return KvcakeError(message, known)
