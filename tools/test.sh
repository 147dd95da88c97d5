#!/usr/bin/env bash
# Runs every check: the formatter's lint, the whole test suite, then the
# hand-off stress test, the failure latch and the QMP server tests again
# under ThreadSanitizer (its own build folder, so the normal build stays
# warm).
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install-deps.sh
# Style is part of the build: the committed .swift-format must hold.
swift format lint --strict -r Sources Tests Package.swift
swift build --build-tests
swift test --skip-build
swift test --scratch-path .build-tsan --sanitize=thread --filter 'MultiFDSendTests|FailureLatchTests|QMPServerTests|QMPFramingTests'
