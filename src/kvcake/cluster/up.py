"""``kvcake up``: a whole cluster on this machine, started in order and stopped in reverse.

::

    kvcake master ──> kvcake node (store memory)
    kvcake conductor (OpenAI API on HOST:PORT, instance RPC on an ephemeral port)
    kvcake worker --role prefill  x N ─┐   each registers with the conductor; prefill
    kvcake worker --role decode   x M  ├─  instances also read and write the store
    kvcake worker --role both     x K ─┘

``up`` returns once ``/health`` reports every instance, then waits for SIGINT/SIGTERM (or a
child's death) and stops the children it started, by pid, newest first.

Secure by default: only the OpenAI API listens on ``host``; every internal RPC port (master,
node, Conductor RPC, workers, their transfer servers) listens on ``internal_host``, loopback
unless told otherwise. Every framed connection between the children proves a cluster token:
the one this process was given, else a random one made here, handed to each child in a file
only this user can read (``--cluster-token-file``; never on a command line, never logged).
``no_token`` runs without one, and is refused with a non-loopback ``internal_host``.
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from kvcake.cluster.token import TokenHandover
from kvcake.common.config import parse_size, require
from kvcake.common.errors import InvalidParamsError, KvcakeError
from kvcake.common.hosts import check_bind_host, is_loopback
from kvcake.conductor.config import ConductorServerConfig
from kvcake.conductor.types import ConductorConfig
from kvcake.ops.etcd import start_etcd
from kvcake.ops.process import ServerProcess, health, kvcake_command, start_master, start_node
from kvcake.wire.conductor import Role

_READY_TIMEOUT_S = 300.0
HA_MASTERS = 2


@dataclass(frozen=True)
class ClusterSpec:
    """What ``kvcake up`` starts. Sizes are strings as the CLI takes them (``512MiB``).

    store_size: memory the storage node contributes ("" or "0": no store at all).
    threads: torch threads per instance (they share the machine's cores).
    max_num_batched_tokens: each instance's token budget per step. Small on CPUs: a
        2048-token step takes seconds, so every request of a burst would get its first
        token (and, colocated, every running request its next one) only at its end.
    pin: place instances (:func:`cpu_plan`): decode instances on CPUs of their own, prefill
        instances anywhere at a lower priority.
    ha: a loopback etcd and ``HA_MASTERS`` store masters electing a leader in it; the
        node, instances and Conductor find the leader there and follow a failover.
    host: the OpenAI API's address, and nothing else's.
    internal_host: the address of every internal RPC port (loopback by default).
    no_token: run without a cluster token (default: the given one, else a random one);
        refused when ``internal_host`` is not loopback.
    max_body_size: the longest HTTP request body the API reads ("": the Conductor's
        default); longer ones get 413.
    """

    host: str = "127.0.0.1"
    internal_host: str = "127.0.0.1"
    no_token: bool = False
    port: int = 8000
    prefill: int = 1
    decode: int = 1
    both: int = 0
    policy: str = "kvcache_centric"
    admission: str = "none"
    slo_ttft_s: float = 30.0
    slo_tbt_s: float = 0.1
    model: str = "smollm2"
    kv_cache_size: str = "512MiB"
    store_size: str = "1GiB"
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    threads: int = 1
    api_key: str = ""
    max_body_size: str = ""  # "": the Conductor's default
    on_decode_failure: str = "fail"
    log_dir: str = ""
    pin: bool = True
    ha: bool = False

    def __post_init__(self) -> None:
        counts = (self.prefill, self.decode, self.both)
        require(all(n >= 0 for n in counts), f"instance counts must be >= 0, got "
                f"prefill={self.prefill} decode={self.decode} both={self.both}")
        require(self.both > 0 or (self.prefill > 0 and self.decode > 0),
                "a cluster needs both > 0, or prefill > 0 and decode > 0")
        # the children's own configs judge their settings, before any child starts
        ConductorConfig(policy=self.policy, admission=self.admission,
                        slo_ttft_s=self.slo_ttft_s, slo_tbt_s=self.slo_tbt_s)
        ConductorServerConfig(port=self.port, on_decode_failure=self.on_decode_failure,
                              max_body_bytes=self.max_body_bytes)
        parse_size(self.kv_cache_size)
        if self.store_size:
            parse_size(self.store_size)
        require(not self.ha or self.has_store, "ha needs the store (a store_size > 0)")
        check_bind_host(self.host)
        check_bind_host(self.internal_host, "internal_host")
        require(not self.no_token or is_loopback(self.internal_host),
                f"internal_host {self.internal_host} is not loopback: its RPC ports need a "
                f"cluster token (drop --no-token; one is generated)")

    @property
    def max_body_bytes(self) -> int:
        if not self.max_body_size:
            return ConductorServerConfig.max_body_bytes
        return parse_size(self.max_body_size)

    @property
    def has_store(self) -> bool:
        return bool(self.store_size) and parse_size(self.store_size) > 0

    @property
    def roles(self) -> list[Role]:
        return [Role.PREFILL] * self.prefill + [Role.DECODE] * self.decode + [Role.BOTH] * self.both


def load_spec(path: str | None, overrides: dict[str, Any]) -> ClusterSpec:
    """Defaults, then the ``[cluster]`` table of a TOML file, then flags (``None``: unset)."""
    values: dict[str, Any] = {}
    if path:
        try:
            table = tomllib.loads(Path(path).read_text()).get("cluster", {})
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise InvalidParamsError(f"cannot read cluster config {path}: {exc}") from exc
        known = {f.name for f in fields(ClusterSpec)}
        unknown = sorted(set(table) - known)
        require(not unknown, f"{path}: unknown [cluster] keys {unknown}; known: "
                f"{sorted(known)}")
        _check_types(path, table)
        values.update(table)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return ClusterSpec(**values)


def _check_types(path: str, table: dict[str, Any]) -> None:
    """Each value of the TOML table has its field's type (an int where a float is wanted)."""
    for field in fields(ClusterSpec):
        kind = _FIELD_TYPES.get(str(field.type))
        if field.name not in table or kind is None:  # None: a type checked by __post_init__
            continue
        value = table[field.name]
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        require(ok or (kind is float and type(value) is int),
                f"{path}: [cluster] {field.name} must be {_TYPE_WORDS[kind]}, "
                f"got {value!r}")


_FIELD_TYPES: dict[str, type] = {"int": int, "float": float, "str": str, "bool": bool}
_TYPE_WORDS = {int: "a whole number", float: "a number", str: "a string",
               bool: "true or false"}


class StartInterruptedError(BaseException):
    """A stop signal while ``kvcake up`` starts (a BaseException: nothing on the way may
    swallow it)."""


class Cluster:
    """The children of one ``kvcake up``; ``stop`` ends them newest first."""

    def __init__(self, spec: ClusterSpec) -> None:
        self.spec = spec
        self.processes: list[ServerProcess] = []
        self.api_endpoint = ""
        self.master = ""
        self.masters: list[ServerProcess] = []  # with ha: any may die while one lives
        self.rpc_endpoint = ""  # where instances register at the Conductor
        self._etcd_dir: tempfile.TemporaryDirectory[str] | None = None
        self.token = TokenHandover()

    def start(self) -> str:
        try:
            self.hand_over_token()
            self._start_store()
            rpc = self._start_conductor()
            plan = cpu_plan(self.spec.roles, sorted(os.sched_getaffinity(0))) \
                if self.spec.pin else [Placement()] * len(self.spec.roles)
            for index, (role, place) in enumerate(zip(self.spec.roles, plan, strict=True)):
                self._start_worker(role, index, rpc, place)
            wait_healthy(self.api_endpoint, self.spec.roles, self.processes)
        except BaseException:
            self.stop()
            raise
        return self.api_endpoint

    def hand_over_token(self) -> None:
        """Write the token file the children read (see :mod:`kvcake.cluster.token`), unless
        the spec says ``no_token``; :meth:`start` calls it first, :meth:`stop` removes it."""
        if not self.spec.no_token:
            self.token.open()

    @property
    def authenticated(self) -> bool:
        """Whether the children prove a cluster token on every framed connection."""
        return bool(self.token.flags)

    def _log(self, name: str) -> str | None:
        if not self.spec.log_dir:
            return None
        Path(self.spec.log_dir).mkdir(parents=True, exist_ok=True)
        return str(Path(self.spec.log_dir) / f"{name}.log")

    def _spawn(self, name: str, args: Sequence[str], ready: str) -> ServerProcess:
        process = ServerProcess(kvcake_command(*args), ready, _READY_TIMEOUT_S, name,
                                log_path=self._log(name))
        self.processes.append(process)
        return process

    def _start_store(self) -> None:
        if not self.spec.has_store:
            return
        if self.spec.ha:
            self._start_ha_masters()
        else:
            master, self.master = start_master("--metrics-port", "-1", *self._internal(),
                                               log_path=self._log("master"))
            self.processes.append(master)
        self.processes.append(start_node(self.master, self.spec.store_size, *self._internal(),
                                         log_path=self._log("node")))

    def _internal(self) -> list[str]:
        """Flags of a child whose ports are internal: its address, and the token file."""
        return ["--host", self.spec.internal_host, *self.token.flags]

    def _start_ha_masters(self) -> None:
        self._etcd_dir = tempfile.TemporaryDirectory(prefix="kvcake-etcd-")
        etcd, endpoint = start_etcd(self._etcd_dir.name)
        self.processes.append(etcd)
        self.master = f"etcd://{endpoint}"
        for index in range(HA_MASTERS):
            master = self._spawn(f"master-{index}", [
                "master", "--port", "0", "--metrics-port", "-1", "--etcd", self.master,
                *self._internal()],
                r"standby")
            self.masters.append(master)
            if index == 0:
                _wait_output(master, "as leader")

    def _start_conductor(self) -> str:
        s = self.spec
        args = ["conductor", "--host", s.host, "--port", str(s.port), "--rpc-port", "0",
                "--rpc-host", s.internal_host, *self.token.flags,
                "--model", s.model, "--policy", s.policy, "--admission", s.admission,
                "--slo-ttft", str(s.slo_ttft_s), "--slo-tbt", str(s.slo_tbt_s),
                "--on-decode-failure", s.on_decode_failure,
                "--max-body-size", str(s.max_body_bytes)]
        if s.api_key:
            args += ["--api-key", s.api_key]
        if self.master:
            args += ["--store-master", self.master]
        conductor = self._spawn("conductor", args,
                                r"OpenAI API on http://(\S+)/v1.*register at (\S+),")
        self.api_endpoint, self.rpc_endpoint = conductor.match.group(1, 2)
        return self.rpc_endpoint

    def _start_worker(self, role: str, index: int, rpc: str, place: Placement) -> None:
        s = self.spec
        name = f"{role}-{index}"
        args = ["worker", "--role", role, "--conductor", rpc, "--instance-id", name,
                "--model", s.model, "--kv-cache-size", s.kv_cache_size,
                "--max-num-seqs", str(s.max_num_seqs), "--max-num-batched-tokens",
                str(s.max_num_batched_tokens), "--threads", str(s.threads), *self._internal()]
        if self.master and role != Role.DECODE:
            args += ["--store-master", self.master]
        if place.cpus:
            args += ["--cpus", place.cpus]
        if place.nice:
            args += ["--nice", str(place.nice)]
        self._spawn(name, args, r"listening on")

    def dead(self) -> ServerProcess | None:
        """A child that died, except a master while another master lives."""
        masters_alive = any(m.alive() for m in self.masters)
        return next((p for p in self.processes if not p.alive()
                     and not (p in self.masters and masters_alive)), None)

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop(timeout_s=15.0)
        self.processes.clear()
        self.token.close()
        if self._etcd_dir is not None:
            self._etcd_dir.cleanup()
            self._etcd_dir = None


def _wait_output(process: ServerProcess, text: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in process.output():
        if not process.alive() or time.monotonic() > deadline:
            raise KvcakeError(f"{process.name} did not print {text!r}: {process.tail()}")
        time.sleep(0.05)


@dataclass(frozen=True)
class Placement:
    """Where an instance runs: ``--cpus`` text ("" = any) and its ``nice`` increment."""

    cpus: str = ""
    nice: int = 0


PREFILL_NICE = 10


def cpu_plan(roles: Sequence[str], cpus: list[int]) -> list[Placement]:
    """Decode instances take CPUs of their own, from the end of the list, while at least one
    is left for the rest, and keep their normal priority: prefill never slows their tokens.
    Prefill instances may run on every CPU at a lower priority (``nice`` 10), so they soak
    up whatever the decode instances leave idle. Colocated instances get one CPU each, round
    robin, at normal priority. On 2 CPUs::

        roles      prefill  prefill  decode        both  both
        cpus       0-1      0-1      1             0     1
        nice       10       10       0             0     0
    """
    decode = [i for i, role in enumerate(roles) if role == Role.DECODE]
    own = len(decode) if len(cpus) > len(decode) else 0
    rest = cpus[:len(cpus) - own]
    every = _cpu_text(cpus)
    plan = [Placement(every, PREFILL_NICE) if role == Role.PREFILL else Placement()
            for role in roles]
    for i, cpu in zip(decode[:own], cpus[len(cpus) - own:], strict=True):
        plan[i] = Placement(str(cpu))
    shared = [i for i, role in enumerate(roles) if role == Role.BOTH or (role == Role.DECODE
                                                                      and not own)]
    for n, i in enumerate(shared):
        plan[i] = Placement(str(rest[n % len(rest)]))
    return plan


def _cpu_text(cpus: list[int]) -> str:
    if cpus == list(range(cpus[0], cpus[-1] + 1)):
        return f"{cpus[0]}-{cpus[-1]}" if len(cpus) > 1 else str(cpus[0])
    return ",".join(map(str, cpus))


def wait_healthy(endpoint: str, roles: Sequence[str], processes: Sequence[ServerProcess],
                 timeout_s: float = _READY_TIMEOUT_S) -> None:
    """Until ``/health`` is 200 and counts every instance of ``roles``."""
    want = {role.value: roles.count(role) for role in Role}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status, body = health(f"http://{endpoint}")
        if status == 200 and body.get("details", {}).get("instances") == want:
            return
        dead = next((p for p in processes if not p.alive()), None)
        if dead is not None:
            raise KvcakeError(f"{dead.name} exited while starting: {dead.tail()}")
        time.sleep(0.2)
    raise KvcakeError(f"the cluster at {endpoint} did not become healthy within "
                      f"{timeout_s:.0f}s (want {want})")


def run_up(spec: ClusterSpec) -> int:
    """Start, print where it serves, wait for a signal or a dead child, stop. Exit code."""
    stop = threading.Event()
    starting = [True]

    def on_signal(*_: object) -> None:
        stop.set()
        if starting[0]:  # abandon the start at once: Cluster.start stops what it started
            starting[0] = False
            raise StartInterruptedError

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    cluster = Cluster(spec)
    started = time.monotonic()
    try:
        endpoint = cluster.start()
    except StartInterruptedError:
        print("kvcake up: stopped while starting", flush=True)
        return 0
    starting[0] = False
    print(f"kvcake up: serving http://{endpoint}/v1 in {time.monotonic() - started:.0f}s — "
          f"model {spec.model!r}, {spec.prefill} prefill + {spec.decode} decode + "
          f"{spec.both} colocated, policy {spec.policy}, admission {spec.admission}"
          f"{', store ' + spec.store_size if spec.has_store else ''}"
          f"{f' ({HA_MASTERS} masters, etcd {cluster.master})' if spec.ha else ''}", flush=True)
    token = f"{cluster.token.origin} cluster token" if cluster.authenticated \
        else "NO cluster token"
    print(f"  internal RPC on {spec.internal_host}, {token}", flush=True)
    print(f"  try: curl http://{endpoint}/v1/completions -H 'Content-Type: application/json' "
          f"-d '{{\"model\": \"{Path(spec.model).name.removesuffix('.gguf')}\", "
          f"\"prompt\": \"The capital of France is\", \"max_tokens\": 8}}'", flush=True)
    print("  Ctrl-C stops everything.", flush=True)
    code = 0
    while not stop.wait(0.5):
        dead = cluster.dead()
        if dead is not None:
            print(f"kvcake up: {dead.name} exited; stopping. {dead.tail()}", flush=True)
            code = 1
            break
    print("kvcake up: stopping", flush=True)
    cluster.stop()
    print("kvcake up: stopped", flush=True)
    return code
