#!/bin/sh
# Installs the Debian packages the kernel datapath needs (and prometheus, whose server and
# promtool the metrics tests use; clang and llvm build the XDP object, clang the fuzz build;
# nftables, the load balancer of the scale-out test), once.
# Needs root and apt-get.
set -eu
PKGS="python3-bpfcc libbpfcc linux-headers-amd64 libxdp-dev libbpf-dev xdp-tools bpftool iproute2 libssl-dev gcc python3-dev prometheus nftables clang llvm"
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "system-deps: not root or no apt-get; kernel datapath tests will skip (run 'sudo make system-deps')"
    exit 0
fi
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "system-deps: installing$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
sh "$(dirname "$0")/link-kernel-headers.sh"
