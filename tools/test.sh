#!/usr/bin/env bash
# Runs every test: the whole suite, then the hand-off stress test again under
# ThreadSanitizer (its own build folder, so the normal build stays warm).
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install-deps.sh
swift build --build-tests
swift test --skip-build
swift test --scratch-path .build-tsan --sanitize=thread --filter 'MultiFDSendTests|FailureLatchTests'
