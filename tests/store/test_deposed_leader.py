"""A leader whose term ends while a call waits (for room, for a promotion) answers nothing
of it: by then a new leader may have handed out the memory the reply would name. The
reply is refused as any call to a deposed leader is, and the client follows the new one."""

from __future__ import annotations

import pytest

from kvcake.common.errors import ErrorCode, KvcakeError
from kvcake.store.master.config import MasterConfig
from kvcake.store.master.server import MasterServer
from kvcake.wire import store as m


class _Election:
    def __init__(self) -> None:
        self.leading = True

    def confirmed(self) -> bool:
        return self.leading


class _Persistence:
    def __init__(self) -> None:
        self.election = _Election()


def test_a_reply_ready_after_the_term_ended_is_refused() -> None:
    server = MasterServer(MasterConfig(port=0, metrics_port=-1))
    persistence = _Persistence()
    server.persistence = persistence  # type: ignore[assignment]
    request = m.Exist(["k"])
    assert server._settle(request) is None  # still leading: the reply leaves
    persistence.election.leading = False  # the term ended while the call waited
    with pytest.raises(KvcakeError) as refused:
        server._settle(request)
    assert refused.value.code is ErrorCode.UNAVAILABLE_IN_CURRENT_MODE
