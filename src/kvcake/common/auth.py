"""Cluster authentication: a shared token, proved by challenge-response, never sent.

With a cluster token configured (``KVCAKE_CLUSTER_TOKEN`` or ``--cluster-token-file``), every
framed server (master RPC, node control RPC, transfer servers, worker and Conductor RPC)
serves a connection only once its peer proved it holds the token. Both sides prove it, so a
client never sends data to an impostor server either::

    client                                               server
      |-- AUTH_HELLO      client nonce (32 B) ------------->|
      |<-- AUTH_CHALLENGE server nonce (32 B) + server MAC -|  MAC = HMAC-SHA256(key, label |
      |-- AUTH_PROOF      client MAC ---------------------->|        nonces), key = HMAC-SHA256
      |== CALL / READ / WRITE / GRANT frames, as without ===|        (token, "kvcake auth v1")

The client pipelines its first frames right after the proof: one round trip per connection,
none per request. Anything else first, a wrong MAC, or silence for ``AUTH_TIMEOUT_S`` gets one
error frame (``UNAUTHENTICATED``, request id 0) and the connection closes; other connections
are untouched. The token authenticates; it does not encrypt: traffic on the wire can still be
read by anyone on the path.

:class:`ServerHandshake` and :class:`ClientHandshake` are the sans-I/O halves; the asyncio
drivers live in :mod:`kvcake.common.stream`. :func:`cluster_auth` is the process's
credentials: set once by the CLI (:func:`use_cluster_token`), otherwise read from the
environment; every server and client takes an explicit ``auth`` to override it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from dataclasses import dataclass, field
from enum import Enum

from kvcake.common.config import read_cluster_token
from kvcake.common.errors import AuthenticationError, ErrorCode, KvcakeError, error_from_code
from kvcake.common.log import get_logger

log = get_logger(__name__)

NONCE_BYTES = 32
MAC_BYTES = 32
MAX_AUTH_PAYLOAD = NONCE_BYTES + MAC_BYTES
AUTH_TIMEOUT_S = 10.0  # an unauthenticated connection is closed after this
_KEY_LABEL = b"kvcake auth v1"
_SERVER_LABEL = b"kvcake-auth-server\0"
_CLIENT_LABEL = b"kvcake-auth-client\0"

HOW_TO_SET = "set KVCAKE_CLUSTER_TOKEN or pass --cluster-token-file"


@dataclass(frozen=True)
class ClusterAuth:
    """A process's cluster credentials; ``token == ""`` means no authentication."""

    token: str = field(default="", repr=False)
    key: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        key = hmac.digest(self.token.encode(), _KEY_LABEL, "sha256") if self.token else b""
        object.__setattr__(self, "key", key)

    @property
    def enabled(self) -> bool:
        return bool(self.token)

    def mac(self, label: bytes, *parts: bytes) -> bytes:
        assert self.enabled
        return hmac.digest(self.key, label + b"".join(parts), hashlib.sha256)


NO_AUTH = ClusterAuth()


class HandshakeStep(Enum):
    """What a :class:`ServerHandshake` waits for next."""

    HELLO = "hello"
    PROOF = "proof"
    DONE = "done"


class ServerHandshake:
    """The server's half: HELLO -> (send the challenge) -> PROOF -> DONE. Every method
    raises :class:`AuthenticationError` on a fault; the connection must then close."""

    def __init__(self, auth: ClusterAuth) -> None:
        assert auth.enabled
        self._auth = auth
        self.step = HandshakeStep.HELLO
        self._client_nonce = b""
        self._server_nonce = secrets.token_bytes(NONCE_BYTES)

    def hello(self, payload: bytes) -> bytes:
        """The client's nonce in; the challenge (our nonce and our proof) out."""
        self._expect(HandshakeStep.HELLO)
        if len(payload) != NONCE_BYTES:
            raise AuthenticationError(f"hello carries {len(payload)} bytes, not a "
                                      f"{NONCE_BYTES}-byte nonce")
        self._client_nonce = payload
        self.step = HandshakeStep.PROOF
        return self._server_nonce + self._auth.mac(_SERVER_LABEL, payload, self._server_nonce)

    def proof(self, payload: bytes) -> None:
        self._expect(HandshakeStep.PROOF)
        expected = self._auth.mac(_CLIENT_LABEL, self._server_nonce, self._client_nonce)
        if not hmac.compare_digest(payload, expected):
            raise AuthenticationError("wrong cluster token (the proof does not match)")
        self.step = HandshakeStep.DONE

    def _expect(self, step: HandshakeStep) -> None:
        if self.step is not step:
            raise AuthenticationError(f"authentication out of order: a {step.value} while "
                                      f"expecting the {self.step.value}")


class ClientHandshake:
    """The client's half: :meth:`hello`, then :meth:`proof` of the server's challenge."""

    def __init__(self, auth: ClusterAuth) -> None:
        assert auth.enabled
        self._auth = auth
        self._client_nonce = secrets.token_bytes(NONCE_BYTES)

    def hello(self) -> bytes:
        return self._client_nonce

    def proof(self, challenge: bytes) -> bytes:
        """Check the server's proof, then answer with ours."""
        if len(challenge) != NONCE_BYTES + MAC_BYTES:
            raise AuthenticationError(f"challenge of {len(challenge)} bytes, expected "
                                      f"{NONCE_BYTES + MAC_BYTES}")
        server_nonce, server_mac = challenge[:NONCE_BYTES], challenge[NONCE_BYTES:]
        expected = self._auth.mac(_SERVER_LABEL, self._client_nonce, server_nonce)
        if not hmac.compare_digest(server_mac, expected):
            raise AuthenticationError("the server holds a different cluster token")
        return self._auth.mac(_CLIENT_LABEL, server_nonce, self._client_nonce)


def refusal(what: str, status: int, text: str) -> KvcakeError:
    """The error for a server's answer of ``status`` to our hello."""
    if status == ErrorCode.UNAUTHENTICATED:
        return error_from_code(status, f"{what}: {text}")
    return AuthenticationError(f"{what} does not take a cluster token (it runs without one; "
                               f"give every process the same token): {text}")


# ----- the process's credentials
_configured: ClusterAuth | None = None


def use_cluster_token(token: str) -> None:
    """Make ``token`` (``""``: none) this process's credentials, whatever the environment."""
    global _configured
    _configured = ClusterAuth(token)


def cluster_auth() -> ClusterAuth:
    """The credentials set by :func:`use_cluster_token`, else ``KVCAKE_CLUSTER_TOKEN``'s."""
    return _configured if _configured is not None else ClusterAuth(read_cluster_token())


def load_cluster_token(token_file: str | None) -> str:
    """The token for a command: ``--cluster-token-file`` (warns when others may read the
    file), else ``KVCAKE_CLUSTER_TOKEN``."""
    token = read_cluster_token(token_file)
    if token_file and os.stat(token_file).st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("cluster token file %s is readable by other users (chmod 600 it)",
                    token_file)
    return token
