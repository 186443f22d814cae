"""Entry point of ``kvcake master``: run until SIGINT/SIGTERM.

With ``--etcd`` a master is a standby until it wins the election, leads until its term ends
(then campaigns again, with a fresh state) or it is signalled (then it resigns, so a standby
takes over at once); see :mod:`kvcake.store.master.ha`.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from kvcake.common.aio import run_main, until_signalled
from kvcake.common.errors import KvcakeError, MetadataError
from kvcake.common.etcd import etcd_client
from kvcake.common.log import get_logger
from kvcake.store.master.config import MasterConfig
from kvcake.store.master.ha import LeaderElection, Persistence, load_journal, split_etcd_url
from kvcake.store.master.journal import restore
from kvcake.store.master.server import MasterServer

_CAMPAIGN_POLL_S = 0.25
_FLUSH_IDLE_S = 0.05

log = get_logger(__name__)


def run_master(config: MasterConfig) -> None:
    run_main(_master_main(config))


async def _master_main(config: MasterConfig) -> None:
    if config.etcd:
        await _ha_master_main(config)
        return
    server = MasterServer(config)
    endpoint = await server.startup()
    metrics = server.metrics_endpoint and f" (metrics http://{server.metrics_endpoint}/metrics)"
    print(f"kvcake master listening on {endpoint}{metrics}", flush=True)
    try:
        await until_signalled()
    finally:
        await server.shutdown()
        log.info("master stopped")


async def _ha_master_main(config: MasterConfig) -> None:
    address, layout = split_etcd_url(config.etcd)
    client = etcd_client(address)
    signalled = asyncio.ensure_future(until_signalled())
    try:
        while not signalled.done():
            print(f"kvcake master standby: campaigning in etcd {address} {layout.prefix}",
                  flush=True)
            election = LeaderElection(client, layout, config.leader_ttl_s)
            if await _campaign(election, signalled):
                await _lead(config, election, signalled)
    finally:
        signalled.cancel()
        client.close()


async def _campaign(election: LeaderElection, signalled: asyncio.Future[Any]) -> bool:
    while not signalled.done():
        try:
            if await asyncio.to_thread(election.try_win):
                return True
        except MetadataError as exc:
            log.warning("campaign failed, retrying: %s", exc)
        await asyncio.wait({signalled}, timeout=_CAMPAIGN_POLL_S)
    return False


async def _lead(config: MasterConfig, election: LeaderElection,
                signalled: asyncio.Future[Any]) -> None:
    """One term: restore, serve, publish; until signalled or the term ends."""
    server = MasterServer(config)
    segments, objects = await asyncio.to_thread(load_journal, election.client, election.layout)
    restore(server.service, segments, objects)
    persistence = Persistence(server.service, election, _FLUSH_IDLE_S)
    server.persist_with(persistence, config.put_fence_s)
    term = [asyncio.ensure_future(persistence.run()), asyncio.ensure_future(_keep(election))]
    try:
        endpoint = await server.startup()
        await asyncio.to_thread(election.publish, endpoint, server.metrics_endpoint)
        print(f"kvcake master listening on {endpoint} as leader ({len(objects)} objects on "
              f"{len(segments)} segments restored)", flush=True)
        done, _ = await asyncio.wait([signalled, *term], return_when=asyncio.FIRST_COMPLETED)
        for task in done - {signalled}:
            log.error("leadership lost: %s", task.exception())
    finally:
        for task in term:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, KvcakeError):
                await task
        await server.shutdown()
        if signalled.done():
            await asyncio.to_thread(election.resign)


async def _keep(election: LeaderElection) -> None:
    while True:
        await asyncio.sleep(election.ttl_s / 4)
        await asyncio.to_thread(election.refresh)
