#!/usr/bin/env bash
# One scenario file (simulation or real processes) with its report.
#
#   chaos-tests/run.sh chaos-tests/scenarios/partition-aggregator-node.toml [out-dir]
set -euo pipefail
cd "$(dirname "$0")/.."
scenario="${1:?usage: chaos-tests/run.sh SCENARIO.toml [OUT_DIR]}"
out="${2:-chaos-out}"
cargo build --release -p phalanx -p phalanx-chaos
exec ./target/release/phalanx-chaos run "$scenario" --out "$out"
