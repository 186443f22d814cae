"""The Conductor: global prefix index, TTFT/TBT prediction, cache- and load-aware routing,
hot-block replication and early rejection, as pure logic driven by a server or a simulator."""

from kvcake.conductor.admission import ADMISSIONS, Admission, make_admission
from kvcake.conductor.config import ConductorConfig
from kvcake.conductor.cost import CostDefaults, CostModel
from kvcake.conductor.index import PrefixIndex
from kvcake.conductor.policy import (
    POLICIES,
    DecodeEstimate,
    Policy,
    PrefillEstimate,
    make_policy,
)
from kvcake.conductor.service import REJECT_REASONS, ConductorService
from kvcake.conductor.types import (
    STORE,
    ConductorStats,
    Decision,
    InstanceStats,
    RouteRequest,
)
from kvcake.wire.conductor import (
    ROLES,
    DecodeSample,
    InstanceLoad,
    KVEvent,
    PrefillSample,
    TransferSample,
)

__all__ = [
    "ADMISSIONS",
    "POLICIES",
    "REJECT_REASONS",
    "ROLES",
    "STORE",
    "Admission",
    "ConductorConfig",
    "ConductorService",
    "ConductorStats",
    "CostDefaults",
    "CostModel",
    "Decision",
    "DecodeEstimate",
    "DecodeSample",
    "InstanceLoad",
    "InstanceStats",
    "KVEvent",
    "Policy",
    "PrefillEstimate",
    "PrefillSample",
    "PrefixIndex",
    "RouteRequest",
    "TransferSample",
    "make_admission",
    "make_policy",
]
