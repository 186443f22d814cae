"""How a put's ``ReplicateConfig`` becomes the terms of the object it creates. Pure.

A plain put never replaces anything; an upsert replaces the object it finds and carries over
what the old one had (hard pin, soft pin, group), with ``soft_pin_action`` deciding the soft
pin (Mooncake's rules):

==========  =====================================  =======================================
action      new key                                replaced key
==========  =====================================  =======================================
PRESERVE    not soft-pinned                        keeps the old soft pin (if still on)
ENABLE      pinned for the ttl (default: master's)  pinned for the ttl, from now
DISABLE     not soft-pinned                        unpinned
==========  =====================================  =======================================

A ttl given with PRESERVE or DISABLE is refused (``INVALID_PARAMS``). An upsert never drops
a hard pin: hard pins only stay or appear.
"""

from __future__ import annotations

from kvcake.common.errors import InvalidParamsError
from kvcake.store.master.objects import PutTerms
from kvcake.wire.store import SOFT_PIN_DISABLE, SOFT_PIN_ENABLE, SOFT_PIN_PRESERVE, ReplicateConfig

MAX_REPLICAS = 16
_ACTIONS = (SOFT_PIN_PRESERVE, SOFT_PIN_ENABLE, SOFT_PIN_DISABLE)


def check_config(config: ReplicateConfig) -> None:
    """Refuse a config no put could honour, naming the field."""
    if not 1 <= config.replica_num <= MAX_REPLICAS:
        raise InvalidParamsError(f"replica_num must be 1..{MAX_REPLICAS}, "
                                 f"got {config.replica_num}")
    if config.soft_pin_action not in _ACTIONS:
        raise InvalidParamsError(f"soft_pin_action must be 0 (PRESERVE), 1 (ENABLE) or "
                                 f"2 (DISABLE), got {config.soft_pin_action}")
    if config.soft_pin_ttl_s < 0:
        raise InvalidParamsError(f"soft_pin_ttl_s must be >= 0, got {config.soft_pin_ttl_s}")
    if config.soft_pin_ttl_s and not config.soft_pinned:
        raise InvalidParamsError("a soft-pin ttl needs soft_pin_action ENABLE")
    if config.with_soft_pin and config.soft_pin_action == SOFT_PIN_DISABLE:
        raise InvalidParamsError("with_soft_pin contradicts soft_pin_action DISABLE")


def put_terms(config: ReplicateConfig, carried: PutTerms, group: str, now: float,
              default_ttl_s: float) -> PutTerms:
    """The new object's terms; ``carried``: the replaced object's (``PutTerms()`` for a
    new key); ``group``: the scoped group id it joins (``""``: ``carried.group``)."""
    if config.soft_pinned:
        soft_until = now + (config.soft_pin_ttl_s or default_ttl_s)
    elif config.soft_pin_action == SOFT_PIN_DISABLE:
        soft_until = 0.0
    else:
        soft_until = carried.soft_pin_until if carried.soft_pin_until > now else 0.0
    return PutTerms(config.with_hard_pin or carried.hard_pinned, soft_until,
                    group or carried.group)
