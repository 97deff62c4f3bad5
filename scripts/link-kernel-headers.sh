#!/bin/sh
# bcc looks for headers under /lib/modules/$(uname -r)/build. This kernel ships none; XDP code
# uses only stable UAPI headers, so Debian's installed header set is good enough.
set -eu
mods=/lib/modules/$(uname -r)
[ -e "$mods/build/include" ] && exit 0
hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
[ -n "$hdr" ] || { echo "link-kernel-headers: no /usr/src/linux-headers-*-amd64 (install linux-headers-amd64)"; exit 0; }
mkdir -p "$mods"
ln -sfn "$hdr" "$mods/build"
ln -sfn "$hdr" "$mods/source"
echo "link-kernel-headers: $mods/build -> $hdr"
