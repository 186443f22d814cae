"""The real Mooncake under ``kvcake bench vllm``'s ``mooncake-real`` row: Mooncake's own
``mooncake_master`` and a Mooncake process that owns the pool (``standalone-store`` mode),
both from the wheel in the vLLM venv (``make vllm-mooncake``).

Mooncake's transfer engine names itself by a routable address and binds every interface, so
the master, the pool and the vLLM processes all run inside one private network namespace
(side ``a`` of a :class:`~kvcake.ops.NetnsPair`, 198.18.0.1): nothing binds outside it, and
the namespaces go when the store does. Needs root and iproute2.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from kvcake.common.errors import KvcakeError
from kvcake.ops import NetnsPair, ServerProcess, check_netns_support

WHEEL = "mooncake-transfer-engine-non-cuda==0.3.13.post1"
INSTALL_HINT = (f"mooncake-real: left out, the real Mooncake is not in the vLLM venv; "
                f"install it with make vllm-mooncake (pip install --no-compile {WHEEL}, "
                f"apt-get install libibverbs1 librdmacm1)")
RPC_PORT, METRICS_PORT = 50051, 9003  # inside a fresh namespace: always free
# the real wheel's master binary, asked of the vLLM venv; kvcake's drop-in has none
_PROBE = ("import mooncake.store; from kvcake.bench.store_baselines import "
          "mooncake_master_binary as m; print(m())")
_KEYS = ("import urllib.request as u; print(next(l.split()[1] for l in u.urlopen("
         "'http://{}/metrics', timeout=5).read().decode().splitlines() "
         "if l.startswith('master_key_count ')))")


@dataclass(frozen=True)
class RealMooncake:
    """A running real Mooncake store: where its clients run and what they are given."""

    prefix: tuple[str, ...]  # runs a command inside the store's namespace
    host: str  # the namespace's address, for every process in it
    master: str  # the master's HOST:PORT
    settle: Callable[[], None]  # waits until the master holds every block saved


def real_master_binary(python: Path) -> str | None:
    """The real ``mooncake_master`` in ``python``'s venv; ``None`` when its wheel (or a
    library it needs) is missing there."""
    result = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True,
                            check=False, timeout=60)
    lines = result.stdout.split()
    return lines[-1] if result.returncode == 0 and lines else None


def missing_real_mooncake(python: Path) -> str | None:
    """Why the ``mooncake-real`` row cannot run here, or ``None`` when it can."""
    if real_master_binary(python) is None:
        return INSTALL_HINT
    try:
        check_netns_support("mooncake-real (the real Mooncake in a network namespace)")
    except KvcakeError as exc:
        return f"mooncake-real: left out; {exc.args[0]}"
    return None


@contextmanager
def real_mooncake_store(python: Path, segment_bytes: int, blocks: int) -> Iterator[RealMooncake]:
    """A namespace holding a real master and a pool process of ``segment_bytes``; its
    ``settle`` waits until the master holds ``blocks`` keys."""
    binary = real_master_binary(python)
    if binary is None:
        raise KvcakeError(INSTALL_HINT)
    with ExitStack() as stack:
        pair = stack.enter_context(NetnsPair("kvcake-vllm"))
        prefix, host = tuple(pair.prefix("a")), pair.address("a")
        master = f"{host}:{RPC_PORT}"
        stack.enter_context(ServerProcess(
            [*prefix, binary, f"--rpc_port={RPC_PORT}", f"--metrics_port={METRICS_PORT}"],
            "Master service started", name="mooncake master"))
        stack.enter_context(ServerProcess(
            [*prefix, str(python), "-m", "kvcake.bench.store_driver", "mooncake-node",
             "--master", master, "--host", host, "--segment-size", str(segment_bytes)],
            "mounted", name="mooncake pool"))
        yield RealMooncake(prefix, host, master,
                           lambda: _wait_keys(prefix, f"{host}:{METRICS_PORT}", blocks))


def _wait_keys(prefix: tuple[str, ...], metrics: str, blocks: int,
               timeout_s: float = 120.0) -> None:
    """Until the master holds every block the writer saved (saves finish off its steps)."""
    deadline = time.monotonic() + timeout_s
    while (held := _held_keys(prefix, metrics)) < blocks:
        if time.monotonic() > deadline:
            raise KvcakeError(f"the real Mooncake holds {held} of {blocks} blocks after "
                              f"{timeout_s}s")
        time.sleep(0.5)


def _held_keys(prefix: tuple[str, ...], metrics: str) -> int:
    """The master's key count, read from inside its namespace (0 while it cannot say)."""
    result = subprocess.run([*prefix, sys.executable, "-c", _KEYS.format(metrics)],
                            capture_output=True, text=True, check=False, timeout=30)
    return int(result.stdout.strip()) if result.returncode == 0 else 0
