#!/usr/bin/env bash
# Installs the client libraries that tests/e2e/test_clients_e2e.py drives against a running
# sidecar, beyond the openai/anthropic SDKs of the dev extras:
#
#   scripts/client-deps.sh [--venv DIR]
#
#   * LangChain's OpenAI chat model (langchain-openai, pinned here) into the venv;
#   * the Vercel AI SDK (ai, @ai-sdk/openai-compatible, zod) and grpc-js (@grpc/grpc-js,
#     @grpc/proto-loader, for tests/e2e/test_grpc_js.py), pinned by the committed
#     tests/clients/node/package-lock.json, into tests/clients/node/node_modules with `npm ci`.
#
# Node.js 18 or newer is needed; when node or npm is missing and this runs as root, it installs
# Debian's nodejs and npm with apt-get. Idempotent and quick when everything is already there.
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=.venv
while [ $# -gt 0 ]; do
  case "$1" in
    --venv) VENV="$2"; shift ;;
    *) echo "client-deps.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
LANGCHAIN_OPENAI=1.8.1

if ! "$VENV/bin/python" -c 'import importlib.metadata as m, sys; sys.exit(m.version("langchain-openai") != sys.argv[1])' "$LANGCHAIN_OPENAI" 2>/dev/null; then
  "$VENV/bin/python" -m pip install -q "langchain-openai==$LANGCHAIN_OPENAI"
fi

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq nodejs npm >/dev/null
  else
    echo "client-deps.sh: Node.js 18+ and npm are needed (Debian: sudo apt-get install nodejs npm)" >&2
    exit 1
  fi
fi
node -e 'if (+process.versions.node.split(".")[0] < 18) { console.error("client-deps.sh: Node.js 18+ is needed, found " + process.version); process.exit(1) }'

NODE_DIR=tests/clients/node
STAMP="$NODE_DIR/node_modules/.package-lock.json"
# npm ci writes node_modules/.package-lock.json: newer than the committed lock means up to date.
if [ ! "$STAMP" -nt "$NODE_DIR/package-lock.json" ]; then
  (cd "$NODE_DIR" && npm ci --no-audit --no-fund --loglevel=error)
fi
