#!/usr/bin/env bash
# Installs what benchmarks/overhead.py needs besides the virtual environment: nginx (the
# canned upstream) and wrk (the load generator). Debian/Ubuntu; run as root. Idempotent:
# apt is only touched when one of them is missing.
#
#   scripts/bench-deps.sh
set -euo pipefail

missing=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v taskset >/dev/null 2>&1 || missing+=(util-linux)

if [ ${#missing[@]} -eq 0 ]; then
  echo "bench-deps.sh: nginx, wrk and taskset are installed"
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "bench-deps.sh: missing ${missing[*]}; run this script as root to install them" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "bench-deps.sh: no apt-get; install ${missing[*]} with your package manager" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends "${missing[@]}"
echo "bench-deps.sh: installed ${missing[*]}"
