"""Operations helpers that ``kvcake up``, the benchmarks, the fault-injection suite and the
tests share: child server processes (start, readiness, stop by pid), a local etcd, and a pair
of network namespaces that stand in for two hosts."""
