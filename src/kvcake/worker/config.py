"""An inference instance's settings under the Conductor (``KVCAKE_WORKER_*``)."""

from __future__ import annotations

from dataclasses import dataclass

from kvcake.common.config import (
    check_at_least,
    check_within,
    is_endpoint,
    parse_cpus,
    require,
)
from kvcake.common.hosts import check_bind_host
from kvcake.wire.conductor import ROLES


@dataclass(frozen=True)
class WorkerConfig:
    """An inference instance under the Conductor (``KVCAKE_WORKER_*``).

    role: ``prefill`` (computes prompts, writes their KV into a decode instance), ``decode``
        (continues them), or ``both`` (colocated: one instance does the whole request).
    conductor: ``HOST:PORT`` of the Conductor's instance RPC endpoint.
    host / port: where this instance's RPC server binds and is reached (port 0: ephemeral).
    instance_id: its name at the Conductor (empty: ``<role>-<pid>``).
    report_s: seconds between load/KV-event reports.
    reserve_timeout_s: a decode reservation whose prefill never commits is freed after this
        (and ``transfer_timeout_s`` more: its grants let the prefill write until then).
    transfer_timeout_s: longest wait for a prefill's KV writes to land.
    profile: time a few prefill and decode steps at start-up, seeding the cost model.
    profile_lock: a file instances started together lock while they profile, so that no
        profile is timed beside another (``kvcake up`` names one per cluster; empty: none).
    cpus: CPUs this instance may run on, e.g. ``1`` or ``0-3`` or ``0,2`` (empty: any). A
        decode instance on cores of its own keeps its token rate whatever prefill does.
    nice: added to this process's nice value (0..19): a prefill instance at a lower priority
        uses the CPU time decode instances leave, never theirs.
    send_by_layer: a prefill instance whose decode instance is on another host sends the
        blocks a step completes layer by layer while the step computes (off: after the step,
        in one piece). Same-host writes are copies and always go after the step.
    """

    role: str = "both"
    conductor: str = "127.0.0.1:8100"
    host: str = "127.0.0.1"
    port: int = 0
    instance_id: str = ""
    report_s: float = 0.1
    reserve_timeout_s: float = 30.0
    transfer_timeout_s: float = 30.0
    profile: bool = True
    profile_lock: str = ""
    cpus: str = ""
    nice: int = 0
    send_by_layer: bool = True

    def __post_init__(self) -> None:
        check_bind_host(self.host)
        parse_cpus(self.cpus)
        check_within(self, 0, 19, "nice")
        require(self.role in ROLES, f"role must be one of {ROLES}, got {self.role!r}")
        require(is_endpoint(self.conductor), f"conductor must be HOST:PORT, got "
                f"{self.conductor!r}")
        check_within(self, 0, 65535, "port")
        check_at_least(self, 0, "report_s", "reserve_timeout_s", "transfer_timeout_s", above=True)
