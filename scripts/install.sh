#!/usr/bin/env bash
# Installs everything the sidecar needs into a virtual environment.
# One script, two callers: the Makefile (developers, CI) and the Containerfile.
#
#   scripts/install.sh [--dev] [--venv DIR]
#
# --dev also installs the test and lint tools. Needs only Python 3.11+ with venv and pip.
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=.venv
EXTRAS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dev) EXTRAS="[dev]" ;;
    --venv) VENV="$2"; shift ;;
    *) echo "install.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  if ! "$PYTHON" -m venv "$VENV" 2>/dev/null; then
    # Debian's python3 ships venv/ensurepip separately.
    rm -rf "$VENV"
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
      apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
    fi
    "$PYTHON" -m venv "$VENV"
  fi
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".$EXTRAS"
echo "install.sh: installed into $VENV"
