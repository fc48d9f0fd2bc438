#!/usr/bin/env bash
# Builds llama.cpp's `llama-server` for benchmarks/local.py, from the very llama.cpp sources
# that llama-cpp-python vendors (its sdist's vendor/llama.cpp), so the benchmark compares
# servers running the same inference code.
#
#   scripts/build-llama-server.sh [--print-path]
#
# Everything lives under .cache/llama-server/ (gitignored): the sdist, its unpacked sources
# and a build directory whose name is a hash of the version and the CMake flags, so a change
# of flags never reuses a build made with other ones. Idempotent: when the binary of these
# flags exists, nothing is downloaded or built. Prints the binary's path on stdout as its last
# line; --print-path prints that path and exits without building (it may not exist yet).
#
# The flags are the portable ones scripts/install.sh uses for llama-cpp-python (no
# -march=native: the native build crashes in ggml's AMX path on some CPUs). No network is
# needed beyond PyPI for the sdist: no web UI (neither npm nor the prebuilt download), no
# curl, no OpenSSL. Needs cmake and a C++ compiler. Override the version with
# LLAMA_CPP_PYTHON_VERSION and the flags with LLAMA_SERVER_CMAKE_ARGS.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
# The version and the portable flags are install.sh's, so the server builds from the very
# llama.cpp sources that llama-cpp-python vendors.
VERSION=$(scripts/install.sh --print-llama-version)
DEFAULT_CMAKE_ARGS="$(scripts/install.sh --print-cmake-args) \
-DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF \
-DCMAKE_BUILD_TYPE=Release"
CMAKE_ARGS="${LLAMA_SERVER_CMAKE_ARGS:-$DEFAULT_CMAKE_ARGS}"
JOBS="${JOBS:-2}"

CACHE="$ROOT/.cache/llama-server"
KEY=$(printf '%s %s' "$VERSION" "$CMAKE_ARGS" | sha256sum | cut -c1-12)
BUILD="$CACHE/build-$VERSION-$KEY"
BINARY="$BUILD/bin/llama-server"

if [ "${1:-}" = "--print-path" ]; then
  echo "$BINARY"
  exit 0
elif [ $# -gt 0 ]; then
  echo "build-llama-server.sh: unknown option $1" >&2
  exit 2
fi

if [ -x "$BINARY" ]; then
  echo "build-llama-server.sh: $BINARY exists, nothing to do" >&2
  echo "$BINARY"
  exit 0
fi

for tool in cmake c++; do
  if ! command -v "$tool" >/dev/null; then
    echo "build-llama-server.sh: please install $tool (Debian: apt-get install cmake build-essential)" >&2
    exit 1
  fi
done

mkdir -p "$CACHE"
SDIST="$CACHE/llama_cpp_python-$VERSION.tar.gz"
if [ ! -f "$SDIST" ]; then
  PIP=(python3 -m pip)
  [ -x "$ROOT/.venv/bin/python" ] && PIP=("$ROOT/.venv/bin/python" -m pip)
  echo "build-llama-server.sh: downloading the llama-cpp-python $VERSION sdist" >&2
  "${PIP[@]}" --disable-pip-version-check download --quiet --no-deps --no-binary :all: \
    -d "$CACHE" "llama-cpp-python==$VERSION"
fi

SRC="$CACHE/src-$VERSION"
if [ ! -f "$SRC/CMakeLists.txt" ]; then
  rm -rf "$SRC.tmp" && mkdir -p "$SRC.tmp"
  tar -xzf "$SDIST" -C "$SRC.tmp" --strip-components=3 \
    "llama_cpp_python-$VERSION/vendor/llama.cpp"
  rm -rf "$SRC" && mv "$SRC.tmp" "$SRC"
fi

echo "build-llama-server.sh: building llama-server ($CMAKE_ARGS) in $BUILD; this takes a while" >&2
# shellcheck disable=SC2086  # CMAKE_ARGS is a list of flags
cmake -S "$SRC" -B "$BUILD" $CMAKE_ARGS >&2
cmake --build "$BUILD" --config Release --target llama-server -j "$JOBS" >&2
printf '%s\n%s\n' "$VERSION" "$CMAKE_ARGS" > "$BUILD/BUILD_FLAGS"
"$BINARY" --version >&2 || true
echo "$BINARY"
