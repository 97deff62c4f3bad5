#!/bin/sh
# bcc looks for headers under /lib/modules/$(uname -r)/build. This kernel ships none; XDP code
# uses only stable UAPI headers, so Debian's installed header set is good enough.
# Debian splits the headers: linux-headers-X-amd64 (config, generated) is `build`, and
# linux-headers-X-common (include/linux/...) must be `source`, or bcc finds no kconfig.h.
set -eu
mods=/lib/modules/$(uname -r)
[ -e "$mods/build/include" ] && [ -e "$mods/source/include/linux/kconfig.h" ] && exit 0
hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
[ -n "$hdr" ] || { echo "link-kernel-headers: no /usr/src/linux-headers-*-amd64 (install linux-headers-amd64)"; exit 0; }
src=$hdr
[ -d "${hdr%-amd64}-common" ] && src=${hdr%-amd64}-common
mkdir -p "$mods"
ln -sfn "$hdr" "$mods/build"
ln -sfn "$src" "$mods/source"
echo "link-kernel-headers: $mods/build -> $hdr, $mods/source -> $src"
