"""The cluster token ``kvcake up`` hands its children, without ever showing it.

The token is the one this process was given (``KVCAKE_CLUSTER_TOKEN``, ``--cluster-token-file``),
else a random one made here. It is written to a file only this user can read (0600, in a
0700 directory); each child gets ``--cluster-token-file PATH``, so command lines (which
``ps`` shows every user) and logs carry the path, never the token.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path

from kvcake.common.auth import cluster_auth


class TokenHandover:
    """:meth:`open` writes the file; :attr:`flags` are the children's; :meth:`close` removes
    it. ``origin`` says whose token it is ("the given" or "a generated"; "" before open)."""

    def __init__(self) -> None:
        self.origin = ""
        self.flags: list[str] = []
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    def open(self) -> None:
        given = cluster_auth().token
        self.origin = "the given" if given else "a generated"
        self._dir = tempfile.TemporaryDirectory(prefix="kvcake-up-")
        path = Path(self._dir.name) / "cluster.token"
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(given or secrets.token_hex(32))
        self.flags = ["--cluster-token-file", str(path)]

    @property
    def path(self) -> str:
        """The token file ("" when none was written)."""
        return self.flags[-1] if self.flags else ""

    def close(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None
