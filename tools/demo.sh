#!/usr/bin/env bash
# The built-in demo: installs what is missing, builds livemig in release mode,
# starts a 256 MiB stress guest (counter pattern: QEMU's a-b test workload),
# migrates it live over loopback TCP with 2 channels and a pre-shared key
# while it writes, checks the destination page by page, resumes the guest
# there and checks it again.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install-deps.sh
swift build -c release --product livemig --static-swift-stdlib >/dev/null
bin=$PWD/.build/release/livemig
dir=$(mktemp -d /dev/shm/livemig-demo.XXXXXX 2>/dev/null || mktemp -d)
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$dir"' EXIT
cd "$dir"
port=$((20000 + RANDOM % 20000))

echo "== source guest: 256 MiB, counter pattern, 2 threads dirtying 200 MiB/s"
"$bin" stress --ram src.ram --control src.ctl --size 256MiB --pattern counter --threads 2 --rate 200MiB/s >guest.out 2>&1 &
pids+=($!); guest=$!
sleep 1

echo "== a pre-shared key: both sides prove it, and every frame and packet carries a MAC"
"$bin" keygen demo.key

echo "== destination: listening with its own RAM file and control file"
"$bin" receive --ram dst.ram --size 256MiB --guest dst.ctl --listen "tcp:127.0.0.1:$port" --psk-file demo.key >recv.out 2>recv.err &
pids+=($!); recv=$!
until grep -q listening recv.err 2>/dev/null; do
  kill -0 $recv 2>/dev/null || { cat recv.err >&2; exit 1; }
  sleep 0.05
done

echo "== live migration (send --guest), statistics of the source:"
"$bin" send --ram src.ram --guest src.ctl --to "tcp:127.0.0.1:$port" --psk-file demo.key --events rounds.jsonl
wait $recv
echo "== statistics of the destination:"
cat recv.out
wait $guest || true
echo "== the source guest:"
cat guest.out
echo "== per-round events:"
cat rounds.jsonl
echo "== checks:"
cmp src.ram dst.ram && echo "destination RAM is byte-identical to the source RAM at the pause"
"$bin" verify --ram dst.ram --control dst.ctl
echo "== resuming the guest on the destination for 1 s:"
"$bin" stress --ram dst.ram --control dst.ctl --resume --duration 1s --rate 200MiB/s
"$bin" verify --ram dst.ram --control dst.ctl
