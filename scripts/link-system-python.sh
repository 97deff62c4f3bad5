#!/bin/sh
# bcc's Python module is pure Python over ctypes and lives in Debian's dist-packages; a .pth
# file makes it importable from the venv (appended after the venv's own site-packages).
set -eu
py=$1
site=$($py -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo /usr/lib/python3/dist-packages > "$site/debian-dist-packages.pth"
