#!/usr/bin/env bash
# Installs what livemig needs to build and is missing on a fresh Debian/Ubuntu
# machine: the headers of liburing, libzstd and libxxhash. Needs root or sudo.
set -euo pipefail
need=()
[ -f /usr/include/liburing.h ] || need+=(liburing-dev)
[ -f /usr/include/zstd.h ] || need+=(libzstd-dev)
[ -f /usr/include/xxh_x86dispatch.h ] || need+=(libxxhash-dev)
command -v python3 >/dev/null || need+=(python3)
# The QMP test drives livemig with qemu.qmp (PyPI), installed with pip below.
if ! command -v python3 >/dev/null || ! python3 -m pip --version >/dev/null 2>&1; then need+=(python3-pip); fi
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing: ${need[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
# qemu.qmp: the QMP client library QEMU's own tests use. As root pip needs
# no prompt (PIP_ROOT_USER_ACTION); a distribution's python that refuses
# pip installs (PEP 668) gets --break-system-packages, since this machine
# is one made to build and test livemig.
if ! python3 -c 'import qemu.qmp' 2>/dev/null; then
  echo "installing: qemu.qmp (PyPI, for the QMP test)" >&2
  export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
  python3 -m pip install --quiet qemu.qmp 2>/dev/null \
    || python3 -m pip install --quiet --break-system-packages qemu.qmp
  python3 -c 'import qemu.qmp' || { echo "error: qemu.qmp did not install; try: python3 -m pip install qemu.qmp" >&2; exit 1; }
fi
if ! command -v swift >/dev/null; then
  echo "error: no Swift toolchain on PATH; install Swift 6 (swift.org) and try again" >&2
  exit 1
fi
