#!/usr/bin/env bash
# Quick-start command 1: set everything up and run the mesh demo.
# Extra arguments go to the demo (e.g. --keep to leave the mesh running).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
ambit_setup
ambit_log "building (release; the first build takes a few minutes)"
cargo build --release --locked -p ztunnel -p waypoint -p istiod-lite -p ambitctl -p e2e --bins
ambit_log "running the demo"
exec ./target/release/ambit-demo "$@"
