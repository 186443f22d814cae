"""The master's admin replies (Mooncake's /query_key, /batch_query_keys, /get_all_keys,
/get_all_segments, /health, /metrics/summary) built from a MasterService with a fake clock:
exact statuses and bodies, and nothing in the service changed by a query."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kvcake.common.errors import ErrorCode, InvalidParamsError
from kvcake.common.http import JSON, TEXT, HttpReply, parse_query
from kvcake.store.master import admin
from kvcake.store.master.admin import Role
from kvcake.store.master.config import MasterConfig, TenantPolicy
from kvcake.store.master.replica import Tier
from kvcake.store.master.service import MasterService
from kvcake.transfer.segment import SegmentDescriptor
from kvcake.wire.store import ReplicateConfig

KIB = 1 << 10
SEGMENT = 64 * KIB


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_service(*tenants: TenantPolicy) -> MasterService:
    return MasterService(MasterConfig(seed=1, tenants=tenants), FakeClock())


def mount(service: MasterService, name: str, endpoint: str = "", shm_socket: str = "",
          token: str = "") -> int:
    service.register_client(f"node-{name}", f"host-{name}", token=token)
    descriptor = SegmentDescriptor(name=name, segment_id=0, size=SEGMENT, host_id=f"host-{name}",
                                   endpoint=endpoint, shm_socket=shm_socket, shm_inode=0)
    return service.mount_segment(f"node-{name}", descriptor)


def put(service: MasterService, key: str, size: int, client_id: str = "writer",
        tenant: str = "default", end: bool = True, replicas: int = 1) -> None:
    if client_id not in service.registry.clients:
        service.register_client(client_id, "host-writer", tenant)
    handles = service.put_start(client_id, key, size, ReplicateConfig(replica_num=replicas))
    assert isinstance(handles, list), handles
    if end:
        assert service.put_end(client_id, key) is ErrorCode.OK


def body(reply: HttpReply) -> Any:
    assert reply.content_type == JSON
    return json.loads(reply.body)


@pytest.fixture
def service() -> MasterService:
    service = make_service()
    mount(service, "seg-a", endpoint="10.0.0.1:7001")
    return service


def test_query_key_describes_each_complete_memory_replica() -> None:
    service = make_service()
    mount(service, "seg-a", endpoint="10.0.0.1:7001")
    mount(service, "seg-b", shm_socket="kvcake-shm-b")  # reachable on its host only
    put(service, "first", 1000, replicas=2)
    put(service, "k", 100, replicas=2)
    reply = admin.query_key(service, "key=k")
    assert reply.status == 200
    data = sorted(body(reply)["data"], key=lambda d: d["protocol_"])
    offsets = {service.registry.segments[r.segment_id].name: r.offset
               for r in service.objects["k"].replicas}
    assert data == [
        {"size_": 100, "buffer_address_": offsets["seg-b"], "protocol_": "shm",
         "transport_endpoint_": "kvcake-shm-b"},
        {"size_": 100, "buffer_address_": offsets["seg-a"], "protocol_": "tcp",
         "transport_endpoint_": "10.0.0.1:7001"},
    ]
    assert min(offsets.values()) >= 1000  # after "first": each replica's own offset


def test_query_key_of_an_absent_key_is_mooncakes_404(service: MasterService) -> None:
    reply = admin.query_key(service, "key=nope")
    assert (reply.status, body(reply)) == (404, {"success": False, "error_code": -704,
                                                 "error_message": "OBJECT_NOT_FOUND"})


def test_query_key_decodes_its_parameter(service: MasterService) -> None:
    put(service, "a b,c/ü+", 10)
    reply = admin.query_key(service, "key=a%20b%2Cc%2F%C3%BC+")
    assert reply.status == 200 and body(reply)["data"][0]["size_"] == 10


def test_a_put_still_open_is_not_ready_and_a_disk_only_object_has_no_memory_entry(
        service: MasterService) -> None:
    put(service, "open", 10, end=False)
    reply = admin.query_key(service, "key=open")
    assert (reply.status, body(reply)["error_message"]) == (404, "REPLICA_IS_NOT_READY")
    put(service, "cold", 10)
    service.objects["cold"].replicas[0].tier = Tier.DISK
    assert body(admin.query_key(service, "key=cold")) == {"success": True, "data": []}


@pytest.mark.parametrize(("query", "status", "code", "words"), [
    ("", 400, -600, "missing query parameter 'key'"),
    ("other=1", 400, -600, "missing query parameter 'key'"),
    ("key=", 400, -400, "INVALID_KEY"),
    ("key=%1Facme/k", 400, -400, "INVALID_KEY"),  # another tenant's object key
    ("key=%zz", 400, -600, "malformed percent-escape '%zz'"),
    ("key=%4", 400, -600, "malformed percent-escape '%4'"),
    ("key=%ff", 400, -600, "not UTF-8"),
    ("key=a&key=b", 400, -600, "'key' is given twice"),
    ("key=" + "x" * 9000, 400, -600, "longer than the 8192 allowed"),
])
def test_query_key_bad_input_is_a_clear_400(service: MasterService, query: str, status: int,
                                            code: int, words: str) -> None:
    reply = admin.query_key(service, query)
    found = body(reply)
    assert (reply.status, found["success"], found["error_code"]) == (status, False, code)
    assert words in found["error_message"]


def test_batch_query_keys_answers_each_key(service: MasterService) -> None:
    put(service, "a", 10)
    put(service, "b", 20)
    reply = admin.batch_query_keys(service, "keys=a,nope,b,")
    assert reply.status == 200
    data = body(reply)["data"]
    assert data["a"]["ok"] is True and data["a"]["values"][0]["size_"] == 10
    assert data["b"]["values"][0]["size_"] == 20
    assert data["nope"] == {"ok": False, "error": "OBJECT_NOT_FOUND"}
    assert data[""] == {"ok": False, "error": "INVALID_KEY"}
    assert list(body(reply)) == ["success", "data"] and body(reply)["success"] is True


@pytest.mark.parametrize("query", ["", "keys=", "key=a", "keys=%zz"])
def test_batch_query_keys_without_keys_is_a_json_400(service: MasterService,
                                                      query: str) -> None:
    reply = admin.batch_query_keys(service, query)
    found = body(reply)
    assert (reply.status, found["success"]) == (400, False)
    assert found["error"]


def test_all_keys_lists_the_default_tenants_readable_keys() -> None:
    service = make_service(TenantPolicy("acme"))
    mount(service, "seg-a", endpoint="10.0.0.1:7001")
    put(service, "zeta", 10)
    put(service, "alpha", 10)
    put(service, "open", 10, end=False)
    put(service, "secret", 10, client_id="acme-client", tenant="acme")
    reply = admin.all_keys(service)
    assert (reply.status, reply.content_type, reply.body) == (200, TEXT, "alpha\nzeta\n")
    assert admin.query_key(service, "key=secret").status == 404  # not the default tenant's


def test_key_endpoints_refuse_when_the_default_tenant_has_a_token() -> None:
    service = make_service(TenantPolicy("default", token="s3cret"))
    mount(service, "seg-a", endpoint="10.0.0.1:7001", token="s3cret")
    for reply in (admin.query_key(service, "key=k"), admin.all_keys(service)):
        assert (reply.status, body(reply)["error_code"]) == (403, -601)
    assert admin.batch_query_keys(service, "keys=k").status == 403
    assert admin.all_segments(service).status == 200


def test_all_segments_lists_names(service: MasterService) -> None:
    mount(service, "seg-0", endpoint="10.0.0.1:7002")
    assert admin.all_segments(service) == HttpReply(200, TEXT, "seg-0\nseg-a\n")
    assert admin.all_segments(make_service()).body == ""


def test_queries_change_nothing(service: MasterService) -> None:
    put(service, "old", 10)
    put(service, "k", 10)

    def state() -> tuple[dict[str, int], float, list[str]]:
        return (dict(service.counters), service.objects["old"].lease_until,
                list(service.table.eviction))

    before = state()
    for _ in range(3):
        admin.query_key(service, "key=old")
        admin.batch_query_keys(service, "keys=old,x")
        admin.all_keys(service)
    assert state() == before and before[2] == ["old", "k"]  # no lease, hit or LRU touch
    assert service.drain_tasks() == []


def test_health_by_role() -> None:
    assert body(admin.health(Role.SINGLE, True)) == {"status": "ok", "role": "single",
                                                      "service_ready": True}
    assert body(admin.health(Role.LEADER, True))["role"] == "leader"
    for role in (Role.STANDBY, Role.LEADER):
        reply = admin.health(role, False)
        found = body(reply)
        assert (reply.status, found["status"], found["role"], found["service_ready"],
                found["error_code"]) == (503, "unavailable", role.value, False, -1011)
    assert "standby" in body(admin.health(Role.STANDBY, False))["error_message"]


def test_a_standby_answers_every_path_and_serves_no_state() -> None:
    routes = admin.standby_routes()
    assert set(admin.SERVICE_PATHS) | {"/health", "/metrics", "/metrics/summary"} == set(routes)
    for path in admin.SERVICE_PATHS:
        reply = routes[path]("key=k")
        assert (reply.status, body(reply)["error_code"]) == (503, -1011)
    assert routes["/health"]("").status == 503
    assert routes["/metrics/summary"]("") == HttpReply(200, TEXT, "role=standby\n")


def test_metrics_summary_is_one_line(service: MasterService) -> None:
    put(service, "k", 10)
    reply = admin.metrics_summary(service, Role.LEADER)
    assert reply.status == 200 and reply.content_type == TEXT
    assert reply.body.startswith("role=leader keys=1 replicas=1 ")
    assert reply.body.count("\n") == 1 and reply.body.endswith("\n")


@pytest.mark.parametrize(("query", "parsed"), [
    ("", {}),
    ("a=1&b=x%2Cy", {"a": "1", "b": "x,y"}),
    ("a+b=c+d", {"a+b": "c+d"}),  # a plus is a plus, as Mooncake's key parameter reads it
    ("flag&&x=", {"flag": "", "x": ""}),
    ("k=%E2%9C%93", {"k": "\u2713"}),
])
def test_parse_query(query: str, parsed: dict[str, str]) -> None:
    assert parse_query(query) == parsed


@pytest.mark.parametrize("query", ["a=%", "a=%G0", "a=%c3", "a=\u00e9", "a=1&a=2",
                                   "a=" + "1" * 8200])
def test_parse_query_refuses_malformed_queries(query: str) -> None:
    with pytest.raises(InvalidParamsError):
        parse_query(query)
