#!/usr/bin/env bash
# Installs what livemig needs to build and is missing on a fresh Debian/Ubuntu
# machine: the headers of liburing, libzstd and libxxhash. Needs root or sudo.
set -euo pipefail
need=()
[ -f /usr/include/liburing.h ] || need+=(liburing-dev)
[ -f /usr/include/zstd.h ] || need+=(libzstd-dev)
[ -f /usr/include/xxh_x86dispatch.h ] || need+=(libxxhash-dev)
command -v python3 >/dev/null || need+=(python3)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing: ${need[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
if ! command -v swift >/dev/null; then
  echo "error: no Swift toolchain on PATH; install Swift 6 (swift.org) and try again" >&2
  exit 1
fi
