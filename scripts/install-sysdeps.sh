#!/usr/bin/env bash
# System packages kvcake uses. With no argument, what the test suite needs: iproute2 (network
# namespaces as test "hosts"), etcd (a real metadata directory) and a C compiler with libc's
# headers (the engine's paged decode kernel is compiled at first use). With "compiler", only
# the compiler (make run). With "mooncake", also the libraries the real Mooncake wheel links
# (libibverbs1, librdmacm1; make vllm-mooncake). Installs only what is missing; needs root to
# install.
set -euo pipefail
missing=()
command -v cc >/dev/null 2>&1 || missing+=(gcc)
[ -e /usr/include/stdint.h ] || missing+=(libc6-dev)
if [ "${1:-}" != compiler ]; then
    command -v ip >/dev/null 2>&1 || missing+=(iproute2)
    command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
fi
if [ "${1:-}" = mooncake ]; then
    ldconfig -p | grep -q 'libibverbs\.so\.1 ' || missing+=(libibverbs1)
    ldconfig -p | grep -q 'librdmacm\.so\.1 ' || missing+=(librdmacm1)
fi
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "install-sysdeps: missing ${missing[*]}; run as root or install them yourself" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
