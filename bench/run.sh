#!/usr/bin/env bash
# Phalanx against PyTorch DDP on the same workload. The one entry command:
#
#   bench/run.sh                 full run (~18 min on 2 cores): BENCHMARKS.md, bench/results/latest.json
#   bench/run.sh --smoke         tiny sizes and steps (about a minute): OUT/latest.json, OUT/BENCHMARKS.md
#   bench/run.sh --smoke --out DIR --phalanx target/debug/phalanx
#
# Installs what it needs when missing (Debian: python3-torch, libopenblas0-pthread; apt-get runs
# non-interactively and needs root), builds `phalanx` in release mode unless --phalanx names a
# binary, then runs bench/bench.py under /usr/bin/python3 (Debian's torch lives there). Every
# other flag goes to bench.py (see `bench/run.sh --help`).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
python=/usr/bin/python3
packages=(python3-torch libopenblas0-pthread)

phalanx=""
args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --phalanx) phalanx="$2"; shift 2 ;;
        --phalanx=*) phalanx="${1#--phalanx=}"; shift ;;
        *) args+=("$1"); shift ;;
    esac
done

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f '${Status}\n' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [[ ${#missing[@]} -gt 0 ]]; then
    if ! command -v apt-get >/dev/null; then
        echo "bench: error: ${missing[*]} not installed and no apt-get here: install them (Debian packages) and run again" >&2
        exit 2
    fi
    if [[ $(id -u) -ne 0 ]]; then
        echo "bench: error: ${missing[*]} not installed; apt-get needs root: sudo apt-get install -y ${missing[*]}" >&2
        exit 2
    fi
    echo "bench: installing ${missing[*]} (apt-get)" >&2
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends "${missing[@]}" >&2; then
        apt-get update -q >&2
        apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
    fi
fi
if [[ ! -x "$python" ]]; then
    echo "bench: error: $python not found (python3-torch installs Debian's Python 3 there)" >&2
    exit 2
fi

if [[ -z "$phalanx" ]]; then
    echo "bench: building phalanx (cargo build --release -p phalanx)" >&2
    (cd "$repo" && cargo build --release --locked -p phalanx >&2)
    phalanx="$repo/target/release/phalanx"
fi

exec "$python" "$here/bench.py" --phalanx "$phalanx" "${args[@]+"${args[@]}"}"
