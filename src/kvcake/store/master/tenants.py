"""Tenants of the store: key namespaces, quotas, tokens and memory use. Pure bookkeeping.

A client names its tenant when it registers (``StoreConfig.tenant``, Mooncake's
``tenant_id``); the master files every key under that tenant, so two tenants that use the
same key string hold two objects, and no get, exist, remove, remove_all or put of one tenant
sees, reads, removes or overwrites another's. Internal object keys::

    tenant     user key      object key at the master (journal, disk-tier file names)
    default    "k"           "k"                 bare, as before tenants existed
    acme       "k"           "\\x1facme/k"       MARK, tenant, "/", key

Tenant names never hold ``/`` and user keys never begin with :data:`MARK`, so the mapping
is one to one. What this is and is not: without tokens a tenant is whatever a client says
it is — namespacing and quota, not security. With a token configured for a tenant, only a
client presenting it registers as that tenant; afterwards the master knows the client by its
(random) client id, so against anyone who can watch or forge traffic also run with the
cluster token on connections (a tenant's token travels in the register call itself).

Quota: the memory-tier bytes a tenant's replicas hold, every replica counted, the disk tier
not; memory that an offload in flight will free no longer counts (as for the watermark).
"""

from __future__ import annotations

import hmac
import json
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from kvcake.common.config import parse_size
from kvcake.common.errors import ErrorCode, InvalidParamsError, PermissionDeniedError
from kvcake.store.config import DEFAULT_TENANT, check_tenant_name
from kvcake.store.master.config import TenantPolicy
from kvcake.store.master.replica import StoredObject, Tier
from kvcake.wire.store import TenantStats

MARK = "\x1f"  # begins every object key of a tenant other than the default one
SEPARATOR = "/"  # between tenant and key; tenant names cannot hold it


# ----- keys
def scoped_key(tenant: str, key: str) -> str:
    """The master's object key for ``key`` of ``tenant``."""
    return key if tenant == DEFAULT_TENANT else f"{MARK}{tenant}{SEPARATOR}{key}"


def tenant_of_key(object_key: str) -> str:
    if not object_key.startswith(MARK):
        return DEFAULT_TENANT
    return object_key[1:].partition(SEPARATOR)[0]


def user_key(object_key: str) -> str:
    """The key as its tenant wrote it."""
    return object_key[1:].partition(SEPARATOR)[2] if object_key.startswith(MARK) else object_key


def check_user_key(key: str) -> None:
    if key.startswith(MARK):
        raise InvalidParamsError("key must not begin with \\x1f (it marks tenant keys)",
                                 ErrorCode.INVALID_KEY)


# ----- the ledger
class TenantLedger:
    """Quotas and tokens by tenant, and the memory each holds.

    The master charges :meth:`charge` as memory replicas are created and released, and
    :meth:`offload_started` / :meth:`offload_ended` around offloads; :meth:`recount` rebuilds
    the usage from objects (after a failover restore). Quotas of 0 mean unlimited.
    """

    def __init__(self, default_quota: int = 0, policies: Iterable[TenantPolicy] = ()) -> None:
        self.default_quota = default_quota
        self.policies = {p.name: p for p in policies}
        self.used: dict[str, int] = {}  # memory bytes of each tenant's replicas
        self.offloading: dict[str, int] = {}  # of those, bytes offloads in flight will free
        self.evicted: dict[str, int] = {}  # objects evicted (deleted or offloaded), ever
        self._offloads: dict[int, tuple[str, int]] = {}  # object id -> (tenant, bytes)

    # ----- terms
    def quota(self, tenant: str) -> int:
        policy = self.policies.get(tenant)
        if policy is None or policy.quota_bytes is None:
            return self.default_quota
        return policy.quota_bytes

    def needs_token(self, tenant: str) -> bool:
        policy = self.policies.get(tenant)
        return policy is not None and bool(policy.token)

    def admit(self, tenant: str, token: str) -> None:
        """Refuse a client that claims ``tenant`` without its token (never says the token)."""
        check_tenant_name(tenant)
        policy = self.policies.get(tenant)
        if policy is None or not policy.token:
            return
        if not token:
            raise PermissionDeniedError(f"tenant {tenant!r} needs a token (set "
                                        "StoreConfig.tenant_token / KVCAKE_STORE_TENANT_TOKEN)")
        if not hmac.compare_digest(policy.token.encode(), token.encode()):
            raise PermissionDeniedError(f"wrong token for tenant {tenant!r}")

    # ----- usage
    def charge(self, tenant: str, nbytes: int) -> None:
        """``nbytes`` more (or, negative, fewer) memory bytes held by ``tenant``."""
        _add(self.used, tenant, nbytes)

    def offload_started(self, object_id: int, tenant: str, nbytes: int) -> None:
        self._offloads[object_id] = (tenant, nbytes)
        _add(self.offloading, tenant, nbytes)

    def offload_ended(self, object_id: int) -> None:
        tenant, nbytes = self._offloads.pop(object_id, (DEFAULT_TENANT, 0))
        _add(self.offloading, tenant, -nbytes)

    def count_eviction(self, tenant: str) -> None:
        _add(self.evicted, tenant, 1)

    def held(self, tenant: str) -> int:
        """Memory that counts against the quota (a segment lost under an offload in flight
        can take ``used`` below ``offloading`` for a moment)."""
        return max(0, self.used.get(tenant, 0) - self.offloading.get(tenant, 0))

    def excess(self, tenant: str, nbytes: int) -> int:
        """Bytes ``tenant`` must free before ``nbytes`` more fit its quota (0: they fit)."""
        quota = self.quota(tenant)
        return max(0, self.held(tenant) + nbytes - quota) if quota else 0

    def shares(self, pool_bytes: int) -> dict[str, int]:
        """Fair share of each tenant holding memory: the pool split evenly among them,
        capped by the tenant's quota."""
        active = [t for t, n in self.used.items() if n > 0]
        even = pool_bytes // max(1, len(active))
        return {t: min(even, self.quota(t) or even) for t in active}

    def over_share(self, tenant: str, shares: Mapping[str, int]) -> bool:
        return self.held(tenant) > shares.get(tenant, 0)

    def names(self) -> list[str]:
        """Tenants with terms or memory, sorted."""
        return sorted(set(self.policies) | {t for t, n in self.used.items() if n})

    def recount(self, used: Mapping[str, int]) -> None:
        """Take ``used`` (memory bytes by tenant, counted from the objects) as the truth."""
        self.used = {t: n for t, n in used.items() if n}

    def check_integrity(self, used: Mapping[str, int]) -> None:
        assert self.used == {t: n for t, n in used.items() if n}, (self.used, dict(used))
        assert all(n >= 0 for n in self.offloading.values()), self.offloading
        pending: dict[str, int] = {}
        for tenant, nbytes in self._offloads.values():
            _add(pending, tenant, nbytes)
        assert pending == self.offloading, (pending, self.offloading)


def usage_by_tenant(objects: Mapping[str, StoredObject]) -> dict[str, int]:
    """Memory bytes of every tenant's replicas, counted from the objects."""
    used: dict[str, int] = {}
    for key, obj in objects.items():
        nbytes = sum(r.size for r in obj.replicas if r.tier is Tier.MEMORY)
        if nbytes:
            _add(used, tenant_of_key(key), nbytes)
    return used


def tenant_stats(ledger: TenantLedger, keys: Mapping[str, int],
                 client_tenants: Iterable[str]) -> list[TenantStats]:
    """One row per tenant with terms, memory, objects (``keys``: complete ones per tenant)
    or live clients, by name."""
    names = set(ledger.names()) | set(keys) | {t for t in client_tenants if t}
    return [TenantStats(t, keys.get(t, 0), ledger.used.get(t, 0), ledger.quota(t),
                        ledger.evicted.get(t, 0)) for t in sorted(names)]


def _add(counts: dict[str, int], tenant: str, delta: int) -> None:
    value = counts.get(tenant, 0) + delta
    assert value >= 0, f"{tenant}: count below zero"
    if value:
        counts[tenant] = value
    else:
        counts.pop(tenant, None)


# ----- configuration from flags and files
def parse_tenant_quota(text: str) -> TenantPolicy:
    """``NAME=SIZE`` (``--tenant-quota acme=512MiB``) to a policy; ``SIZE`` 0 = unlimited."""
    name, sep, size = text.partition("=")
    if not sep:
        raise InvalidParamsError(f"tenant quota must look like NAME=SIZE, got {text!r}")
    return TenantPolicy(name.strip(), parse_size(size))


def load_tenants(path: str) -> tuple[int | None, tuple[TenantPolicy, ...]]:
    """The default quota (``None``: not given) and tenants of a TOML or JSON file::

        default_quota = "1GiB"
        [tenants.acme]
        quota = "512MiB"
        token = "..."            # optional: registering as acme then needs it
        [tenants.free]           # no quota: default_quota; quota = 0: unlimited
    """
    data = _read_document(path)
    unknown = set(data) - {"default_quota", "tenants"}
    if unknown:
        raise InvalidParamsError(f"{path}: unknown settings {sorted(unknown)}")
    default = data.get("default_quota")
    tenants = data.get("tenants", {})
    if not isinstance(tenants, dict):
        raise InvalidParamsError(f"{path}: tenants must be a table of tenant names")
    policies = tuple(_policy(path, name, terms) for name, terms in tenants.items())
    return (None if default is None else _size(path, "default_quota", default)), policies


def merge_tenants(base: Iterable[TenantPolicy], quotas: Iterable[TenantPolicy]
                  ) -> tuple[TenantPolicy, ...]:
    """``base`` (a file's) with the quotas of ``quotas`` (flags) put over it, tokens kept."""
    merged = {p.name: p for p in base}
    for flag in quotas:
        token = merged[flag.name].token if flag.name in merged else ""
        merged[flag.name] = TenantPolicy(flag.name, flag.quota_bytes, token)
    return tuple(merged.values())


def _read_document(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidParamsError(f"cannot read tenants file {path}: {exc}") from None
    try:
        data = json.loads(text) if path.endswith(".json") else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise InvalidParamsError(f"tenants file {path} is not valid "
                                 f"{'JSON' if path.endswith('.json') else 'TOML'}: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidParamsError(f"tenants file {path} must hold a table")
    return data


def _policy(path: str, name: str, terms: Any) -> TenantPolicy:
    if not isinstance(terms, dict) or set(terms) - {"quota", "token"}:
        raise InvalidParamsError(f"{path}: tenant {name!r} takes only quota and token")
    token = terms.get("token", "")
    if not isinstance(token, str):
        raise InvalidParamsError(f"{path}: token of tenant {name!r} must be a string")
    quota = terms.get("quota")
    return TenantPolicy(name, None if quota is None else _size(path, f"quota of {name!r}", quota),
                        token)


def _size(path: str, what: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidParamsError(f"{path}: {what} must be bytes or a size like 512MiB")
    return value if isinstance(value, int) else parse_size(value)
