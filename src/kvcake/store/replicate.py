"""``ReplicateConfig``: how to store a put, with Mooncake's Python attributes.

Mooncake's names and kvcake's older ones both work on one object, and it turns into the wire
struct (:class:`kvcake.wire.store.ReplicateConfig`) only when a put is sent::

    config = ReplicateConfig(replica_num=2)             # keywords, as kvcake code writes it
    config.soft_pin_action = SoftPinAction.ENABLE       # attributes, as Mooncake code does
    config.soft_pin_ttl_ms = 60_000                     # None: the master's default ttl

=========================  =============================================================
attribute                  meaning
=========================  =============================================================
replica_num                copies on segments of distinct names (1..16)
soft_pin_action            PRESERVE (default), ENABLE or DISABLE (see below)
soft_pin_ttl_ms            soft-pin length, ms (``None``: the master's default); only with
                           ENABLE; a negative or >= 2**64 value raises ``TypeError``
with_hard_pin              never evicted
preferred_segment          a segment name to place the first replica on
preferred_segments         segment names to place replicas on first, in order
prefer_alloc_in_same_node  place on segments of this host first (one replica only)
group_ids                  one group id per key of the call (``None``: no groups)
with_soft_pin              kvcake's name for ``soft_pin_action == ENABLE``
soft_pin_ttl_s             kvcake's name for the ttl in seconds (0: default)
=========================  =============================================================

``soft_pin_action`` on a new key: ENABLE pins it; on a key an upsert replaces: PRESERVE keeps
the old pin, ENABLE pins anew, DISABLE unpins (:mod:`kvcake.store.master.puts`).
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

from kvcake.common.errors import InvalidParamsError
from kvcake.wire import store as wire

_MAX_TTL_MS = 1 << 64


class SoftPinAction(IntEnum):
    """Mooncake's ``SoftPinAction``."""

    PRESERVE = wire.SOFT_PIN_PRESERVE
    ENABLE = wire.SOFT_PIN_ENABLE
    DISABLE = wire.SOFT_PIN_DISABLE


class ReplicateConfig:
    """See the module docstring; keyword arguments set attributes of either naming."""

    def __init__(self, **attributes: Any) -> None:
        self.replica_num = 1
        self._soft_pin_action = SoftPinAction.PRESERVE
        self._soft_pin_ttl_ms: int | None = None
        self.with_hard_pin = False
        self.preferred_segment = ""
        self.preferred_segments: list[str] = []
        self.prefer_alloc_in_same_node = False
        self.group_ids: list[str] | None = None
        for name, value in attributes.items():
            if not hasattr(self, name):
                raise TypeError(f"ReplicateConfig has no attribute {name!r}")
            setattr(self, name, value)

    @property
    def soft_pin_action(self) -> SoftPinAction:
        return self._soft_pin_action

    @soft_pin_action.setter
    def soft_pin_action(self, value: SoftPinAction) -> None:
        if not isinstance(value, SoftPinAction):
            raise TypeError(f"soft_pin_action must be a SoftPinAction, got {value!r}")
        self._soft_pin_action = value

    @property
    def soft_pin_ttl_ms(self) -> int | None:
        return self._soft_pin_ttl_ms

    @soft_pin_ttl_ms.setter
    def soft_pin_ttl_ms(self, value: int | None) -> None:
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or not 0 <= value < _MAX_TTL_MS):
            raise TypeError(f"soft_pin_ttl_ms must be None or an int in 0..2**64-1, "
                            f"got {value!r}")
        self._soft_pin_ttl_ms = value

    @property
    def with_soft_pin(self) -> bool:
        return self.soft_pin_action == SoftPinAction.ENABLE

    @with_soft_pin.setter
    def with_soft_pin(self, value: bool) -> None:
        self.soft_pin_action = SoftPinAction.ENABLE if value else SoftPinAction.PRESERVE

    @property
    def soft_pin_ttl_s(self) -> float:
        return (self._soft_pin_ttl_ms or 0) / 1000

    @soft_pin_ttl_s.setter
    def soft_pin_ttl_s(self, value: float) -> None:
        self.soft_pin_ttl_ms = round(value * 1000) if value else None

    def to_wire(self, num_keys: int) -> wire.ReplicateConfig:
        """The struct a put of ``num_keys`` keys sends; ``InvalidParamsError`` for a ttl
        without ENABLE, or ``group_ids`` of another length."""
        if self._soft_pin_ttl_ms is not None and self.soft_pin_action != SoftPinAction.ENABLE:
            raise InvalidParamsError("soft_pin_ttl_ms needs soft_pin_action ENABLE")
        if self.group_ids is not None and len(self.group_ids) != num_keys:
            raise InvalidParamsError(f"{num_keys} keys but {len(self.group_ids)} group_ids")
        action, ttl_ms = self._soft_pin_action, self._soft_pin_ttl_ms
        if action == SoftPinAction.ENABLE and ttl_ms == 0:  # pinned for no time: unpinned
            action, ttl_ms = SoftPinAction.DISABLE, None
        return wire.ReplicateConfig(
            replica_num=self.replica_num, soft_pin_ttl_s=ttl_ms / 1000 if ttl_ms else 0.0,
            with_hard_pin=self.with_hard_pin, preferred_segment=self.preferred_segment,
            soft_pin_action=int(action),
            preferred_segments=list(self.preferred_segments),
            prefer_same_host=self.prefer_alloc_in_same_node,
            group_ids=list(self.group_ids or []))

    def __str__(self) -> str:
        ttl = "default" if self._soft_pin_ttl_ms is None else self._soft_pin_ttl_ms
        groups = "" if self.group_ids is None else f", group_ids: {self.group_ids}"
        return (f"ReplicateConfig: {{ replica_num: {self.replica_num}, soft_pin_action: "
                f"{self.soft_pin_action.name}, soft_pin_ttl_ms: {ttl}, with_hard_pin: "
                f"{self.with_hard_pin}, preferred_segments: {self.preferred_segments}, "
                f"preferred_segment: {self.preferred_segment!r}, prefer_alloc_in_same_node: "
                f"{self.prefer_alloc_in_same_node}{groups} }}")

    __repr__ = __str__


AnyConfig = ReplicateConfig | wire.ReplicateConfig


def as_wire(config: AnyConfig | None, num_keys: int) -> wire.ReplicateConfig:
    """The wire struct of ``config`` (either class) for a put of ``num_keys`` keys."""
    if config is None:
        return wire.ReplicateConfig()
    if isinstance(config, wire.ReplicateConfig):
        return config
    return config.to_wire(num_keys)
