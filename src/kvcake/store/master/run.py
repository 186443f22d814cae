"""Entry point of ``kvcake master``: run until SIGINT/SIGTERM.

With ``--etcd`` a master is a standby until it wins the election, leads until its term ends
(then campaigns again, with a fresh state) or it is signalled (then it resigns, so a standby
takes over at once); see :mod:`kvcake.store.master.ha`. A standby's HTTP port answers
``/health`` with 503 (:func:`kvcake.store.master.admin.standby_routes`); when that port is
taken (a leader on the same host, same port) it campaigns without one.
"""

from __future__ import annotations

import asyncio
import contextlib

from kvcake.common.aio import run_main
from kvcake.common.errors import KvcakeError, MetadataError
from kvcake.common.etcd import etcd_client
from kvcake.common.http import TextHttpServer
from kvcake.common.lifespan import Lifespan
from kvcake.common.log import get_logger
from kvcake.store.leader import split_etcd_url
from kvcake.store.master.admin import standby_routes
from kvcake.store.master.config import MasterConfig
from kvcake.store.master.ha import LeaderElection, Persistence, load_journal
from kvcake.store.master.journal import restore
from kvcake.store.master.server import MasterServer

_CAMPAIGN_POLL_S = 0.25
_FLUSH_IDLE_S = 0.05

log = get_logger(__name__)


def run_master(config: MasterConfig, ready_file: str = "") -> None:
    run_main(_master_main(config, ready_file))


async def _master_main(config: MasterConfig, ready_file: str) -> None:
    async with Lifespan("master", ready_file) as life:
        if config.etcd:
            await _ha_master_main(config, life)
            return
        server = MasterServer(config)
        endpoint = await server.startup()
        life.on_stop("the master", server.shutdown)
        metrics = server.metrics_endpoint and \
            f" (metrics http://{server.metrics_endpoint}/metrics)"
        await life.serve(f"kvcake master listening on {endpoint}{metrics}",
                         {"rpc": endpoint, "metrics": server.metrics_endpoint})


async def _ha_master_main(config: MasterConfig, life: Lifespan) -> None:
    address, layout = split_etcd_url(config.etcd)
    client = etcd_client(address)
    life.on_stop("the etcd client", client.close)
    while not life.stopping.is_set():
        http, metrics = await _standby_http(config)
        life.announce(f"kvcake master standby: campaigning in etcd {address} {layout.prefix}",
                      {"etcd": config.etcd, **({"metrics": metrics} if metrics else {})})
        election = LeaderElection(client, layout, config.leader_ttl_s)
        try:
            won = await _campaign(election, life.stopping)
        finally:
            if http is not None:
                await http.shutdown()  # the leader's server binds the port next
        if won:
            await _lead(config, election, life)


async def _standby_http(config: MasterConfig) -> tuple[TextHttpServer | None, str]:
    """The standby's HTTP server and its endpoint; none when the port is off or taken."""
    if config.metrics_port < 0:
        return None, ""
    http = TextHttpServer(standby_routes(), config.host, config.metrics_port)
    try:
        return http, await http.startup()
    except OSError as exc:
        log.warning("standby: no HTTP port (%s); campaigning without one", exc)
        return None, ""


async def _campaign(election: LeaderElection, stopping: asyncio.Event) -> bool:
    while not stopping.is_set():
        try:
            if await asyncio.to_thread(election.try_win):
                return True
        except MetadataError as exc:
            log.warning("campaign failed, retrying: %s", exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), _CAMPAIGN_POLL_S)
    return False


async def _lead(config: MasterConfig, election: LeaderElection, life: Lifespan) -> None:
    """One term: restore, serve, publish; until signalled or the term ends."""
    server = MasterServer(config)
    segments, objects = await asyncio.to_thread(load_journal, election.client, election.layout)
    restore(server.service, segments, objects)
    persistence = Persistence(server.service, election, _FLUSH_IDLE_S)
    server.persist_with(persistence, config.put_fence_s)
    stopping = asyncio.ensure_future(life.stopping.wait())
    term = [asyncio.ensure_future(persistence.run()), asyncio.ensure_future(_keep(election))]
    try:
        endpoint = await server.startup()
        await asyncio.to_thread(election.publish, endpoint, server.metrics_endpoint)
        life.announce(f"kvcake master listening on {endpoint} as leader ({len(objects)} "
                      f"objects on {len(segments)} segments restored)",
                      {"rpc": endpoint, "metrics": server.metrics_endpoint,
                       "etcd": config.etcd})
        done, _ = await asyncio.wait([stopping, *term], return_when=asyncio.FIRST_COMPLETED)
        for task in done - {stopping}:
            log.error("leadership lost: %s", task.exception())
    finally:
        for task in [stopping, *term]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, KvcakeError):
                await task
        await server.shutdown()
        if life.stopping.is_set():
            await asyncio.to_thread(election.resign)


async def _keep(election: LeaderElection) -> None:
    while True:
        await asyncio.sleep(election.ttl_s / 4)
        await asyncio.to_thread(election.refresh)
