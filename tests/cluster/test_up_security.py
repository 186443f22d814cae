"""``kvcake up`` is secure with no configuration: its children prove a generated cluster token
on every framed connection (read from a 0600 file, never on a command line, never in a log),
and only the API listens on ``--host``; internal RPC stays on loopback."""

from __future__ import annotations

import asyncio
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvcake.cli import main
from kvcake.cluster import Cluster, ClusterSpec
from kvcake.common import codec
from kvcake.common.auth import NO_AUTH, ClusterAuth
from kvcake.common.errors import AuthenticationError, ErrorCode
from kvcake.common.rpc import RpcClient
from kvcake.wire import store as m


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    spec = ClusterSpec(port=0, prefill=0, decode=0, both=1, kv_cache_size="32MiB",
                       store_size="16MiB", log_dir=str(tmp_path_factory.mktemp("logs")))
    cluster = Cluster(spec)
    cluster.start()
    yield cluster
    cluster.stop()


def _get_stats(endpoint: str, auth: ClusterAuth) -> bytes:
    async def call() -> bytes:
        client = RpcClient(endpoint, 10.0, auth)
        try:
            return await client.call(codec.encode(m.GetStats()))
        finally:
            client.close()
    return asyncio.run(call())


@pytest.mark.parametrize("port", ["master", "conductor rpc"])
def test_every_internal_port_refuses_a_peer_without_the_token(cluster: Cluster,
                                                              port: str) -> None:
    endpoint = cluster.master if port == "master" else cluster.rpc_endpoint
    assert endpoint.startswith("127.0.0.1:")
    with pytest.raises(AuthenticationError) as caught:
        _get_stats(endpoint, NO_AUTH)
    assert caught.value.code is ErrorCode.UNAUTHENTICATED


def test_the_token_file_admits_and_never_leaks(cluster: Cluster) -> None:
    token = Path(cluster.token.path).read_text()
    assert cluster.authenticated and cluster.token.origin == "a generated"
    assert Path(cluster.token.path).stat().st_mode & 0o077 == 0
    assert _get_stats(cluster.master, ClusterAuth(token))  # the master serves the token
    for process in cluster.processes:
        argv = Path(f"/proc/{process.pid}/cmdline").read_bytes().decode()
        assert token not in argv and "--cluster-token-file" in argv, process.name
        assert token not in process.output(), process.name
        config = Path(process.command[process.command.index("--config") + 1])
        assert config.stat().st_mode & 0o077 == 0, process.name
        section, key = _INTERNAL_HOST[process.name.split("-")[0]]
        assert tomllib.loads(config.read_text())[section][key] == "127.0.0.1", process.name


_INTERNAL_HOST = {"master": ("master", "host"), "node": ("transfer", "host"),
                  "conductor": ("conductor", "rpc_host"), "both": ("worker", "host")}


def test_no_token_with_internal_ports_off_loopback_is_refused(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["up", "--no-token", "--internal-host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "internal_host 0.0.0.0 is not loopback: its RPC ports need a cluster token" in err
