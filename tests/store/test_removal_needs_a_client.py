"""A caller that did not register is nobody: over a real socket, its remove and
``remove_all(force)`` are refused whole (ILLEGAL_CLIENT) and delete nothing; a registered
client deletes only its own tenant's objects."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from kvcake.common import codec
from kvcake.common.errors import ErrorCode, KvcakeError
from kvcake.store.master.service import MasterService
from kvcake.transfer.segment import SegmentDescriptor
from kvcake.wire import store as m
from master_thread import ThreadMaster, thread_master


def fill(service: MasterService) -> None:
    """``owner`` (default tenant) holds a, b; ``acme-client`` (tenant acme) holds c."""
    service.register_client("owner", "host-owner")
    service.register_client("acme-client", "host-acme", "acme")
    service.mount_segment("owner", SegmentDescriptor("pool", 0, 1 << 20, "host-owner",
                                                     "127.0.0.1:1", "", 0))
    for client_id, key in (("owner", "a"), ("owner", "b"), ("acme-client", "c")):
        assert isinstance(service.put_start(client_id, key, 64, m.ReplicateConfig()), list)
        assert service.put_end(client_id, key) is ErrorCode.OK


@pytest.fixture
def master() -> Iterator[ThreadMaster]:
    with thread_master("removal-master") as master:
        master.run(lambda server: fill(server.service))
        yield master


def _num_keys(master: ThreadMaster) -> int:
    return master.run(lambda server: server.service.stats().num_keys)


@pytest.mark.parametrize("request_", [m.RemoveAll(force=True), m.RemoveAll(),
                                      m.Remove(["a", "b"], force=True)],
                         ids=["remove_all_force", "remove_all", "remove"])
def test_a_caller_that_did_not_register_deletes_nothing(master: ThreadMaster,
                                                        request_: Any) -> None:
    with pytest.raises(KvcakeError) as caught:
        master.call(request_)
    assert caught.value.code is ErrorCode.ILLEGAL_CLIENT
    assert "need a registered client" in str(caught.value)
    assert _num_keys(master) == 3
    reply = codec.decode(master.call(m.Exist(["a", "b"])), m.CodesReply)
    assert reply.codes == [1, 1]  # reads without a client id still read the default tenant


def test_an_unknown_client_id_deletes_nothing(master: ThreadMaster) -> None:
    with pytest.raises(KvcakeError) as caught:
        master.call(m.RemoveAll(force=True, client_id="ghost"))
    assert "unknown client 'ghost': register first" in str(caught.value)
    assert _num_keys(master) == 3


def test_a_registered_client_removes_only_its_own_tenants_objects(master: ThreadMaster) -> None:
    reply = codec.decode(master.call(m.RemoveAll(force=True, client_id="acme-client")),
                         m.CountReply)
    assert reply.count == 1 and _num_keys(master) == 2
    codes = codec.decode(master.call(m.Remove(["a"], client_id="acme-client")),
                         m.CodesReply).codes
    assert codes == [ErrorCode.OBJECT_NOT_FOUND]  # "a" of acme: there is none
    assert codec.decode(master.call(m.RemoveAll(force=True, client_id="owner")),
                        m.CountReply).count == 2
    assert _num_keys(master) == 0
