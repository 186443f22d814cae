"""How a ``kvcake`` command fails: one line on stderr naming what was wrong, and a non-zero
exit code, never a traceback.

========================================  ====  ==========================================
failure                                   exit  line
========================================  ====  ==========================================
a flag argparse refuses                   2     ``kvcake worker: error: argument --port: …``
``KvcakeError`` (a bad value, a refusal,  2     ``kvcake: error: <its message>``
a child or a peer that did not answer)
``OSError`` (a port in use, no such …)    1     ``kvcake: error: cannot listen on H:P: …``
anything else                             1     ``kvcake: error: <type>: <message>``
========================================  ====  ==========================================

A ``KvcakeError``'s message is printed as written: ``bench serve``'s launcher appends the
failed set-up's log tails to its first line. The traceback of the last kind is logged at
DEBUG (``--log-level DEBUG`` shows it).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
from typing import NoReturn

from kvcake.common.errors import KvcakeError

USAGE_EXIT = 2
FAILED_EXIT = 1

_BIND_ADDRESS = re.compile(r"address \('([^']*)', (\d+)")


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose refusal is one line (no usage block); its sub-command
    parsers are of the same class."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_EXIT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def describe_failure(exc: Exception) -> tuple[str, int]:
    """The one line and the exit code for ``exc``, raised by a command."""
    if isinstance(exc, KvcakeError):
        return str(exc), USAGE_EXIT  # written to be read; a launcher's may carry log tails
    if isinstance(exc, OSError):
        return _describe_os_error(exc), FAILED_EXIT
    logging.getLogger("kvcake").debug("the command failed", exc_info=exc)
    return _one_line(f"{type(exc).__name__}: {exc}"), FAILED_EXIT


def _describe_os_error(exc: OSError) -> str:
    if exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
        found = _BIND_ADDRESS.search(str(exc))
        if found is not None:
            return (f"cannot listen on {found[1]}:{found[2]}: "
                    f"{os.strerror(exc.errno).lower()}"
                    + (" (another process holds it; choose another port)"
                       if exc.errno == errno.EADDRINUSE else ""))
    where = f": {exc.filename}" if exc.filename is not None else ""
    return _one_line(f"{exc.strerror}{where}" if exc.strerror else str(exc))


def _one_line(text: str) -> str:
    return " ".join(text.split())
