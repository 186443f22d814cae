"""Every server kvcake starts listens on loopback unless told otherwise."""

from __future__ import annotations

import inspect

from kvcake.api.server import ApiServer
from kvcake.cluster.up import ClusterSpec
from kvcake.conductor.config import ConductorServerConfig
from kvcake.store.master.config import MasterConfig
from kvcake.transfer.config import TransferConfig
from kvcake.worker.config import WorkerConfig


def test_every_server_config_binds_loopback_by_default() -> None:
    configs = (MasterConfig(), TransferConfig(), WorkerConfig(), ConductorServerConfig(),
               ClusterSpec())
    assert {type(c).__name__: c.host for c in configs} == {
        type(c).__name__: "127.0.0.1" for c in configs}
    assert inspect.signature(ApiServer).parameters["host"].default == "127.0.0.1"
    assert ClusterSpec().internal_host == "127.0.0.1"
    assert ConductorServerConfig().rpc_bind_host == "127.0.0.1"
    assert ConductorServerConfig(host="0.0.0.0", rpc_host="127.0.0.1").rpc_bind_host == \
        "127.0.0.1"
