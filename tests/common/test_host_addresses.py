"""A listener's ``host`` must be an address of this machine: every command refuses another
with one clear line, before it starts anything."""

from __future__ import annotations

import pytest

from kvcake.cli import main
from kvcake.common.errors import InvalidParamsError
from kvcake.common.hosts import check_bind_host, is_loopback
from kvcake.conductor.config import ConductorServerConfig
from kvcake.store.master.config import MasterConfig
from kvcake.transfer.config import TransferConfig
from kvcake.worker.config import WorkerConfig

ELSEWHERE = "192.0.2.1"  # TEST-NET-1 (RFC 5737): never an address of this machine


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.5", "localhost", "0.0.0.0", "::",
                                  "::1"])
def test_loopback_and_every_address_are_fine(host: str) -> None:
    assert check_bind_host(host) == host


@pytest.mark.parametrize(("host", "why"), [
    (ELSEWHERE, "Cannot assign requested address"),
    ("no-such-host.invalid", "it does not resolve"),
])
def test_an_address_of_another_machine_is_refused_by_name(host: str, why: str) -> None:
    with pytest.raises(InvalidParamsError) as caught:
        check_bind_host(host, "internal_host")
    text = str(caught.value)
    assert text.startswith(f"INVALID_PARAMS: internal_host {host!r} is not an address of "
                           "this machine") and why in text and "\n" not in text


@pytest.mark.parametrize("make", [
    lambda: MasterConfig(host=ELSEWHERE), lambda: TransferConfig(host=ELSEWHERE),
    lambda: WorkerConfig(host=ELSEWHERE), lambda: ConductorServerConfig(host=ELSEWHERE),
    lambda: ConductorServerConfig(rpc_host=ELSEWHERE)])
def test_every_listener_config_checks_its_host(make: object) -> None:
    with pytest.raises(InvalidParamsError, match="is not an address of this machine"):
        make()  # type: ignore[operator]


@pytest.mark.parametrize("args", [
    ("up", "--host", ELSEWHERE), ("up", "--internal-host", ELSEWHERE),
    ("master", "--host", ELSEWHERE), ("node", "--segment-size", "1MiB", "--host", ELSEWHERE),
    ("conductor", "--host", ELSEWHERE), ("conductor", "--rpc-host", ELSEWHERE),
    ("worker", "--host", ELSEWHERE), ("transfer", "serve", "--host", ELSEWHERE),
], ids=" ".join)
def test_every_command_refuses_a_foreign_host_in_one_line(
        args: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(list(args)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{ELSEWHERE!r} is not an address of this machine" in err


def test_loopback_is_told_apart() -> None:
    assert [is_loopback(h) for h in ("127.0.0.1", "::1", "localhost", "0.0.0.0", ELSEWHERE,
                                     "example")] == [True, True, True, False, False, False]
