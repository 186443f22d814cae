"""The master's admin endpoints on its HTTP port, with Mooncake's paths and reply shapes:
pure functions from the service's state (and the raw query string) to an
:class:`~kvcake.common.http.HttpReply`. :class:`~kvcake.store.master.server.MasterServer`
only routes to them; a standby (``kvcake master --etcd``, campaigning) routes to
:func:`standby_routes`::

    /health                    200 {"status":"ok","role":"single"|"leader",...}; 503 JSON
    /metrics/summary           one text line
    /query_key?key=K           200 {"success":true,"data":[descriptor, ...]}; 400, 404
    /batch_query_keys?keys=..  200 {"success":true,"data":{K:{"ok":...},...}}; 400
    /get_all_keys              text, each key then a newline
    /get_all_segments          text, each segment name then a newline

A descriptor is one COMPLETE memory replica: ``size_`` (the object's bytes),
``buffer_address_`` (kvcake has no shared address space: the replica's byte offset in its
segment), ``protocol_`` and ``transport_endpoint_`` (the segment owner's transfer server).
These endpoints only read: no lease, no hit counted, no LRU touch, no promotion queued.

Tenants: like Mooncake's, the key endpoints see the default tenant only: a caller of this
port has no client id, so it acts in the default tenant (:meth:`MasterService.tenant_of`).
Other tenants' keys are neither listed nor reachable (their object keys begin with a mark
that a key may not hold). When the default tenant has a token, the key endpoints answer 403.
"""

from __future__ import annotations

from enum import Enum

from kvcake.common.errors import ErrorCode, InvalidParamsError, KvcakeError
from kvcake.common.http import HttpReply, Routes, json_reply, parse_query, text_reply
from kvcake.store.config import DEFAULT_TENANT
from kvcake.store.master.metrics import summary_line
from kvcake.store.master.replica import StoredObject, Tier
from kvcake.store.master.service import MasterService
from kvcake.store.master.tenants import scoped_key, tenant_of_key

Descriptor = dict[str, int | str]
# only what reads the store's state: the paths a master that is not serving refuses
SERVICE_PATHS = ("/query_key", "/batch_query_keys", "/get_all_keys", "/get_all_segments")


class Role(Enum):
    SINGLE = "single"  # no etcd: the only master
    LEADER = "leader"  # won the election in etcd
    STANDBY = "standby"  # campaigning in etcd: holds no state


_NOT_SERVING = {
    Role.STANDBY: "this master is a standby: the leader named in etcd serves",
    Role.LEADER: "this master's term as leader is not confirmed: ask the leader named in etcd",
    Role.SINGLE: "this master is not serving",
}


# ----- health and summaries
def health(role: Role, serving: bool) -> HttpReply:
    """200 while this master serves; 503 otherwise, saying why."""
    if serving:
        return json_reply({"status": "ok", "role": role.value, "service_ready": True})
    return json_reply({"status": "unavailable", "role": role.value, "service_ready": False,
                       "error_code": int(ErrorCode.UNAVAILABLE_IN_CURRENT_MODE),
                       "error_message": _NOT_SERVING[role]}, 503)


def metrics_summary(service: MasterService, role: Role) -> HttpReply:
    return text_reply(f"role={role.value} {summary_line(service.stats(), service.counters)}\n")


def unavailable(role: Role) -> HttpReply:
    """What a master that is not serving answers on :data:`SERVICE_PATHS`."""
    return _error(ErrorCode.UNAVAILABLE_IN_CURRENT_MODE, _NOT_SERVING[role], 503)


def standby_routes() -> Routes:
    """A standby's whole HTTP port: it holds no state, so it says so."""
    routes: Routes = {path: lambda _: unavailable(Role.STANDBY) for path in SERVICE_PATHS}
    return {**routes, "/health": lambda _: health(Role.STANDBY, False),
            "/metrics": lambda _: text_reply("# kvcake master standby: no store state here\n"),
            "/metrics/summary": lambda _: text_reply(f"role={Role.STANDBY.value}\n")}


# ----- keys and segments
def query_key(service: MasterService, query: str) -> HttpReply:
    """``key``'s complete memory replicas; 404 naming the code when it has none."""
    try:
        _may_read(service)
        key = _required(parse_query(query), "key")
    except KvcakeError as exc:
        return _error(exc.code, str(exc), exc.status)
    found = memory_replicas(service, key)
    if isinstance(found, ErrorCode):
        return _error(found, found.name, 400 if found is ErrorCode.INVALID_KEY else 404)
    return json_reply({"success": True, "data": found})


def batch_query_keys(service: MasterService, query: str) -> HttpReply:
    """Each of the comma-separated ``keys``: ``{"ok":true,"values":[..]}`` or
    ``{"ok":false,"error":CODE_NAME}``; 400 when no key is given."""
    try:
        _may_read(service)
        keys = parse_query(query).get("keys", "")
    except KvcakeError as exc:
        return json_reply({"success": False, "error": str(exc)}, exc.status)
    if not keys:
        return json_reply({"success": False, "error": "no keys given: use "
                           "/batch_query_keys?keys=KEY1,KEY2 (percent-encoded)"}, 400)
    data = {key: _batch_item(memory_replicas(service, key)) for key in keys.split(",")}
    return json_reply({"success": True, "data": data})


def all_keys(service: MasterService) -> HttpReply:
    """The default tenant's keys with a readable replica (any tier), sorted."""
    try:
        _may_read(service)
    except KvcakeError as exc:
        return _error(exc.code, str(exc), exc.status)
    keys = sorted(k for k, o in service.objects.items()
                  if tenant_of_key(k) == DEFAULT_TENANT and o.complete and o.readable())
    return text_reply("".join(f"{key}\n" for key in keys))


def all_segments(service: MasterService) -> HttpReply:
    """Names of the mounted segments (every tenant's objects share them), sorted."""
    names = sorted(s.name for s in service.registry.segments.values())
    return text_reply("".join(f"{name}\n" for name in names))


def memory_replicas(service: MasterService, key: str) -> list[Descriptor] | ErrorCode:
    """Descriptors of ``key``'s COMPLETE memory replicas (default tenant); ``[]`` when it is
    readable only on disk. ``INVALID_KEY``, ``OBJECT_NOT_FOUND``, or
    ``REPLICA_IS_NOT_READY`` while its put is open or no replica is readable."""
    try:
        service.check_key(key)
    except KvcakeError as exc:
        return exc.code
    obj = service.objects.get(scoped_key(DEFAULT_TENANT, key))
    if obj is None:
        return ErrorCode.OBJECT_NOT_FOUND
    if not obj.complete or not obj.readable():
        return ErrorCode.REPLICA_IS_NOT_READY
    return _descriptors(service, obj)


def _descriptors(service: MasterService, obj: StoredObject) -> list[Descriptor]:
    found: list[Descriptor] = []
    for replica in obj.readable(Tier.MEMORY):
        owner = service.registry.segments[replica.segment_id].descriptor
        protocol, endpoint = ("tcp", owner.endpoint) if owner.endpoint \
            else ("shm", owner.shm_socket)  # a same-host-only segment
        found.append({"size_": obj.size, "buffer_address_": replica.offset,
                      "protocol_": protocol, "transport_endpoint_": endpoint})
    return found


def _batch_item(found: list[Descriptor] | ErrorCode) -> dict[str, object]:
    if isinstance(found, ErrorCode):
        return {"ok": False, "error": found.name}
    return {"ok": True, "values": found}


def _may_read(service: MasterService) -> None:
    """This port's callers act in the default tenant: refused when it has a token."""
    service.tenant_of("")


def _required(params: dict[str, str], name: str) -> str:
    if name not in params:
        raise InvalidParamsError(f"missing query parameter {name!r}")
    return params[name]


def _error(code: ErrorCode, message: str, status: int) -> HttpReply:
    return json_reply({"success": False, "error_code": int(code), "error_message": message},
                      status)
