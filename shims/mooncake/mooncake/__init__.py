"""kvcake's drop-in for Mooncake's ``mooncake`` package — this is not Mooncake.

``mooncake.store`` re-exports kvcake's implementation of Mooncake's store API
(:mod:`kvcake.store.compat`) under Mooncake's names, so code and tests written for
``from mooncake.store import MooncakeDistributedStore`` run against a kvcake master
unchanged. Only the store is provided (no transfer-engine or EP modules).

It is opt-in and never part of kvcake's own install: put ``<kvcake repo>/shims/mooncake`` on
``PYTHONPATH``, or ``make mooncake-shim VENV=<venv>`` (``pip install --no-deps`` of this
directory; refused where Mooncake's own ``mooncake-transfer-engine*`` wheel is installed, as
both provide the ``mooncake`` package).
"""

DROP_IN = "kvcake"  # who serves this package: a test or a script may check it
