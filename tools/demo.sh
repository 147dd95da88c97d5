#!/usr/bin/env bash
# The built-in demo: installs what is missing, builds livemig in release mode,
# and migrates a 256 MiB RAM file (random, text-like and zero pages) from one
# process to another over loopback TCP with 2 channels, printing the stats of
# both sides and checking the copy is byte-identical.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install-deps.sh
swift build -c release --product livemig >/dev/null
bin=.build/release/livemig
dir=$(mktemp -d /dev/shm/livemig-demo.XXXXXX 2>/dev/null || mktemp -d)
trap 'kill $recv 2>/dev/null || true; rm -rf "$dir"' EXIT
python3 - "$dir/src.ram" <<'PY'
import os, sys
page = 4096
with open(sys.argv[1], "wb") as f:
    for i in range(65536):
        k = i % 4
        if k < 2: f.write(bytes(page))                       # zero pages
        elif k == 2: f.write(((b"livemig demo page %08d " % i) * 160)[:page])  # text-like
        else: f.write(os.urandom(page))                      # random
PY
port=$((20000 + RANDOM % 20000))
$bin receive --ram "$dir/dst.ram" --size 256MiB --listen "tcp:127.0.0.1:$port" --channels 2 2>"$dir/recv.err" >"$dir/recv.out" &
recv=$!
until grep -q listening "$dir/recv.err" 2>/dev/null; do
  kill -0 $recv 2>/dev/null || { cat "$dir/recv.err" >&2; exit 1; }
  sleep 0.05
done
$bin send --ram "$dir/src.ram" --to "tcp:127.0.0.1:$port" --channels 2
wait $recv
cat "$dir/recv.out"
cmp "$dir/src.ram" "$dir/dst.ram" && echo "demo: destination RAM is byte-identical to the source"
