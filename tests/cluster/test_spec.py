"""``kvcake up``'s spec: defaults, a TOML ``[cluster]`` table, flags on top, CPU plans; what a
cluster refuses to kill or restart."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest

from kvcake.cluster.up import Cluster, ClusterSpec, Placement, cpu_plan, load_spec
from kvcake.common.config import parse_cpus
from kvcake.common.errors import InvalidParamsError
from kvcake.wire.conductor import Role


def test_flags_override_the_file_which_overrides_defaults(tmp_path: Path) -> None:
    path = tmp_path / "cluster.toml"
    path.write_text('[cluster]\nprefill = 3\ndecode = 2\npolicy = "round_robin"\n'
                    'kv_cache_size = "1GiB"\n')
    spec = load_spec(str(path), {"decode": 1, "policy": None})
    assert (spec.prefill, spec.decode, spec.policy, spec.kv_cache_size) == (
        3, 1, "round_robin", "1GiB")
    assert spec.roles == ["prefill"] * 3 + ["decode"]
    assert load_spec(None, {}) == ClusterSpec()


def test_a_bad_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "cluster.toml"
    path.write_text("[cluster]\nprefil = 2\n")
    with pytest.raises(InvalidParamsError, match=r"unknown \[cluster\] keys \['prefil'\]"):
        load_spec(str(path), {})
    path.write_text("[cluster\n")
    with pytest.raises(InvalidParamsError, match="cannot read cluster config"):
        load_spec(str(path), {})
    with pytest.raises(InvalidParamsError, match="not a size"):
        ClusterSpec(kv_cache_size="lots")
    with pytest.raises(InvalidParamsError, match="max_body_bytes must be >= 1"):
        ClusterSpec(max_body_size="0")


P, D = Placement("0-1", 10), Placement


@pytest.mark.parametrize(("roles", "cpus", "plan"), [
    (["prefill", "decode"], [0, 1], [P, D("1")]),
    (["prefill", "prefill", "decode"], [0, 1], [P, P, D("1")]),
    (["both", "both"], [0, 1], [D("0"), D("1")]),
    (["prefill", "decode", "decode"], [0, 1, 2, 3],
     [Placement("0-3", 10), D("2"), D("3")]),
    (["prefill", "decode", "decode"], [0, 1], [P, D("0"), D("1")]),  # none left over: share
    (["prefill", "decode"], [5], [Placement("5", 10), D("5")]),
])
def test_decode_instances_get_cpus_of_their_own(roles: list[str], cpus: list[int],
                                                 plan: list[Placement]) -> None:
    assert cpu_plan(roles, cpus) == plan


def test_cpu_lists_parse() -> None:
    assert parse_cpus("0-2,5") == {0, 1, 2, 5}
    assert parse_cpus("") == set()
    with pytest.raises(InvalidParamsError, match="cpus must look like"):
        parse_cpus("a-b")
    with pytest.raises(InvalidParamsError, match="runs backwards"):
        parse_cpus("3-1")


def test_internal_ports_stay_on_loopback_unless_told_and_need_a_token_elsewhere() -> None:
    spec = ClusterSpec(host="0.0.0.0")
    assert (spec.host, spec.internal_host, spec.no_token) == ("0.0.0.0", "127.0.0.1", False)
    assert ClusterSpec(internal_host="0.0.0.0").internal_host == "0.0.0.0"  # token generated
    assert ClusterSpec(no_token=True).no_token  # on loopback: allowed
    with pytest.raises(InvalidParamsError, match=r"internal_host 0\.0\.0\.0 is not loopback: "
                       r"its RPC ports need a cluster token \(drop --no-token"):
        ClusterSpec(internal_host="0.0.0.0", no_token=True)


def test_a_host_of_another_machine_is_refused() -> None:
    with pytest.raises(InvalidParamsError, match=r"host '192\.0\.2\.1' is not an address of this"):
        ClusterSpec(host="192.0.2.1")


def test_killing_or_restarting_what_the_cluster_does_not_run_is_refused_by_name() -> None:
    cluster = Cluster(ClusterSpec())  # nothing started
    with pytest.raises(InvalidParamsError, match=r"no running child 'prefill-0'"):
        cluster.kill("prefill-0")
    with pytest.raises(InvalidParamsError, match=r"no instance 'prefill-0' in this cluster"):
        cluster.start_instance("prefill-0")


@pytest.mark.parametrize("profile", [True, False])
def test_each_instance_is_told_its_profile_and_only_prefill_keeps_plain_weights(
        monkeypatch: pytest.MonkeyPatch, profile: bool) -> None:
    """What each worker's config file says: the spec's start-up profile, and plain prefill
    weights for instances that prefill (a decode instance's would be memory for nothing)."""
    told: dict[str, dict[str, dict[str, Any]]] = {}
    cluster = Cluster(ClusterSpec(prefill=1, decode=1, both=1, profile=profile))
    monkeypatch.setattr(cluster, "_spawn", lambda name, command, sections, **_: (
        told.setdefault(name, sections)))
    cluster._places = {name: (role, Placement()) for name, role in (
        ("prefill-0", Role.PREFILL), ("decode-1", Role.DECODE), ("both-2", Role.BOTH))}
    cluster._dir = tempfile.TemporaryDirectory(prefix="kvcake-test-")
    try:
        for name in cluster._places:
            cluster._start_worker(name, "127.0.0.1:1")
    finally:
        cluster._dir.cleanup()
    assert {name: (s["worker"]["profile"], s["engine"]["plain_prefill_weights"])
            for name, s in told.items()} == {
        "prefill-0": (profile, True), "decode-1": (profile, False), "both-2": (profile, True)}
