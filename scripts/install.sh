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
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".$EXTRAS"
echo "install.sh: installed into $VENV"
