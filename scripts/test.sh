#!/usr/bin/env bash
# Quick-start command 2: set everything up and run the whole test suite.
#   lint (rustfmt, clippy -D warnings) → build → every test, unit and end-to-end.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
ambit_setup

ambit_log "cargo fmt --check"
cargo fmt --all -- --check

ambit_log "cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

ambit_log "building binaries"
cargo build --workspace --bins --locked

if [ "$(id -u)" -ne 0 ]; then
  echo "NOTE: not root: tests that need root, network namespaces or eBPF will say SKIPPED loudly." >&2
fi

ambit_log "running the test suite"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast --failure-output final
else
  cargo test --workspace --locked --no-fail-fast
fi
ambit_log "all tests passed"
