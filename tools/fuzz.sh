#!/usr/bin/env bash
# Builds every libFuzzer target (Fuzz/, README "Fuzzing") into .build-fuzz
# and runs each for SECONDS (default 30) on a copy of its seed corpus
# (Fuzz/corpus/TARGET). Prints per target the executions per second, the
# corpus size, libFuzzer's coverage (cov: edges, ft: features) and the time
# run. A crash, leak or hang keeps its input in .build-fuzz/crashes/TARGET/
# and makes the script exit 1 once every target has run.
#
#   tools/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-30}
shift || true
all=(hello packet main-message stress-state receiver)
targets=("${@:-${all[@]}}")
out=.build-fuzz
bin=$out/bin
mkdir -p "$bin" "$out/shim"
flags=(-sanitize=fuzzer,address -parse-as-library -O -g -warnings-as-errors -use-ld=lld)
wire=(Sources/MigrationWire/*.swift)

build() {
  case $1 in
    hello | packet | main-message)
      # Pure decoders: the MigrationWire sources compiled into the target.
      swiftc "${flags[@]}" -module-name "Fuzz${1//-/}" "${wire[@]}" "Fuzz/Targets/$1.swift" -o "$bin/fuzz-$1" ;;
    stress-state)
      # The real StressState.swift against a stand-in GuestMemory that
      # holds only the error type it reports.
      swiftc -parse-as-library -O -emit-library -static -emit-module -module-name GuestMemory \
        -emit-module-path "$out/shim/GuestMemory.swiftmodule" -o "$out/shim/libGuestMemory.a" Fuzz/Shims/GuestMemory.swift
      swiftc "${flags[@]}" -module-name Workload -I "$out/shim" Sources/Workload/StressState.swift \
        "Fuzz/Targets/$1.swift" "$out/shim/libGuestMemory.a" -o "$bin/fuzz-$1" ;;
    receiver)
      # The real Migration module and everything under it, built by SwiftPM
      # with coverage and ASan (debug: @testable needs -enable-testing).
      swift build --package-path Fuzz --scratch-path "$out/receiver" --product FuzzReceiver \
        -Xswiftc -sanitize=fuzzer,address
      cp "$out/receiver/debug/FuzzReceiver" "$bin/fuzz-receiver" ;;
    *) echo "fuzz.sh: no target '$1' (targets: ${all[*]})" >&2; exit 2 ;;
  esac
}

for t in "${targets[@]}"; do
  echo "== building fuzz-$t"
  build "$t"
done

status=0
summary=()
for t in "${targets[@]}"; do
  work=$out/run/$t
  crashes=$out/crashes/$t
  rm -rf "$work"
  mkdir -p "$work/corpus" "$crashes"
  # A copy: what the run learns stays out of the committed seeds.
  cp Fuzz/corpus/"$t"/* "$work/corpus/" 2>/dev/null || true
  seeds=$(ls "$work/corpus" | wc -l)
  echo "== fuzz-$t: ${seconds}s from $seeds seeds"
  start=$(date +%s)
  set +e
  "$bin/fuzz-$t" -max_total_time="$seconds" -timeout=20 -print_final_stats=1 \
    -artifact_prefix="$crashes/" "$work/corpus" >"$work/log" 2>&1
  rc=$?
  set -e
  took=$(($(date +%s) - start))
  last=$(grep -E '^#[0-9]+' "$work/log" | tail -1 || true)
  cov=$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<<"$last")
  ft=$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<<"$last")
  corp=$(sed -nE 's/.* corp: ([0-9]+\/[0-9]+[a-zA-Z]*).*/\1/p' <<<"$last")
  execs=$(sed -nE 's/^stat::average_exec_per_sec: *([0-9]+)/\1/p' "$work/log")
  runs=$(sed -nE 's/^stat::number_of_executed_units: *([0-9]+)/\1/p' "$work/log")
  line=$(printf '%-13s %6ss %9s exec/s %10s runs  cov %-6s ft %-6s corpus %s' \
    "$t" "$took" "${execs:-?}" "${runs:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}")
  if [ $rc -ne 0 ]; then
    status=1
    found=$(ls "$crashes" | tr '\n' ' ')
    line="$line  FAILED (exit $rc): $crashes/ $found"
    grep -E 'ERROR|Fatal error|panic|Precondition|deadly signal|timeout' "$work/log" | head -5 | sed 's/^/    /'
  fi
  echo "$line"
  summary+=("$line")
done

echo
echo "== summary (logs in $out/run/TARGET/log)"
printf '%s\n' "${summary[@]}"
exit $status
