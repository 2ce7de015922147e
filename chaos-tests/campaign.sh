#!/usr/bin/env bash
# A chaos campaign: simulated seeds plus every real-process scenario.
#
#   chaos-tests/campaign.sh                  # 240 seeds + the process scenarios, report in chaos-out/
#   chaos-tests/campaign.sh 1000 out/        # 1000 seeds, report in out/
#   SOAK=30m chaos-tests/campaign.sh         # keep going for 30 minutes
#
# The disk-full scenarios mount a tmpfs and need root. Exit code: 0 when every
# invariant held, 1 on a violation (printed, and in the report), 2 on an error.
set -euo pipefail
cd "$(dirname "$0")/.."
seeds="${1:-240}"
out="${2:-chaos-out}"
cargo build --release -p phalanx -p phalanx-chaos
exec ./target/release/phalanx-chaos campaign --seeds "$seeds" --out "$out" ${SOAK:+--duration "$SOAK"}
