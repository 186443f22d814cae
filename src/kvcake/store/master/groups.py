"""Object groups (Mooncake's ``ReplicateConfig.group_ids``): objects put with one group id
share placement, leases and eviction. Pure bookkeeping.

=============  ==============================================================================
placement      a new member's replicas go to the segments its group's members are on first
lease          a get or exist of one member leases every complete member of the group
eviction       a group leaves memory together, and not at all while any member is leased or
               busy (hard-pinned members stay; soft-pinned ones go in the soft pass)
membership     fixed while the object lives: an upsert that names another group is refused
=============  ==============================================================================

Group ids are scoped by tenant like keys (:func:`kvcake.store.master.tenants.scoped_key`), so
two tenants' groups of one name are two groups.
"""

from __future__ import annotations


class GroupIndex:
    """The object keys of each group."""

    def __init__(self) -> None:
        self._members: dict[str, set[str]] = {}

    def add(self, group: str, key: str) -> None:
        if group:
            self._members.setdefault(group, set()).add(key)

    def discard(self, group: str, key: str) -> None:
        members = self._members.get(group)
        if members is None:
            return
        members.discard(key)
        if not members:
            del self._members[group]

    def members(self, group: str) -> set[str]:
        """The keys in ``group`` (empty for no group)."""
        return self._members.get(group, set()) if group else set()

    def check_integrity(self, groups_by_key: dict[str, str]) -> None:
        """``groups_by_key``: each object's group, counted from the objects."""
        expected: dict[str, set[str]] = {}
        for key, group in groups_by_key.items():
            if group:
                expected.setdefault(group, set()).add(key)
        assert self._members == expected, (self._members, expected)
