#!/usr/bin/env bash
# Run SGLang's own frontend client (the real `sglang` package) against scripts/serve.py and record the
# exact requests it sends into tests/data/sglang_client/*.json (replayed in CI by tests/test_sglang_client.py).
#
#   bash scripts/sglang_client_check.sh            # builds $VENV once, starts a server, runs the programs
#
# The sglang frontend imports torch and triton at import time, so it lives in a scratch venv outside the
# repo (never in CI). Environment:
#   VENV         scratch venv (default /tmp/jaxradix-sglang-client-venv)
#   PYTHON       interpreter for it (default python3; it must match the torch wheel you pick)
#   TORCH_SPEC   pip requirement for a CPU torch (default "torch"; e.g. a local "torch==2.13.0+cpu" wheel)
#   SGLANG_SPEC  default sglang==0.5.23 (installed --no-deps: the frontend needs only the list below)
#   PORT         server port (default 30123); RECORD=0 skips writing tests/data
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/tmp/jaxradix-sglang-client-venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch}
SGLANG_SPEC=${SGLANG_SPEC:-sglang==0.5.23}
PORT=${PORT:-30123}
FRONTEND_DEPS="numpy orjson psutil pybase64 requests typing_extensions triton packaging pillow starlette msgspec
  pydantic pyzmq tqdm ipython aiohttp"

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import sglang" 2>/dev/null; then
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q "$TORCH_SPEC"
  "$VENV/bin/pip" install -q --no-deps "$SGLANG_SPEC"
  # shellcheck disable=SC2086
  "$VENV/bin/pip" install -q $FRONTEND_DEPS
fi

.venv/bin/python scripts/serve.py --port "$PORT" --log-level warning --max-total-tokens 8192 \
  --context-length 2048 --max-running-requests 16 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
  kill -0 $SERVER 2>/dev/null || { echo "server died"; exit 1; }
  sleep 1
done
OUT=tests/data/sglang_client
[ "${RECORD:-1}" = 1 ] || OUT=""
"$VENV/bin/python" scripts/sglang_client_check.py --url "http://127.0.0.1:$PORT" ${OUT:+--record "$OUT"}
