#!/usr/bin/env bash
# MXNet 1.9.1's engine on pskv's engine dispatch workloads (see
# scripts/mxnet_engine_dispatch.c): builds the driver against the
# libmxnet.so of ../shared/peers/setup.sh's venv and runs it.
#
# usage: scripts/mxnet_engine_dispatch.sh [THREADS (default 2)] [REPS (default 10)]
# env:   MXNET_ENGINE_TYPE (default ThreadedEnginePerDevice, MXNet's default;
#        ThreadedEngine is the one shared pool), MXENV (the venv)
set -euo pipefail
THREADS=${1:-2}
REPS=${2:-10}
HERE=$(cd "$(dirname "$0")" && pwd)
MXENV=${MXENV:-$HOME/.cache/pskv-peers/mxenv}
LIB=$(ls -d "$MXENV"/lib/python3*/site-packages/mxnet 2>/dev/null | head -1)
if [ -z "$LIB" ] || [ ! -e "$LIB/libmxnet.so" ]; then
    echo "no libmxnet.so under $MXENV: run ../shared/peers/setup.sh first" >&2
    exit 1
fi
OUT=${TMPDIR:-/tmp}/pskv-mxnet-engine-dispatch
cc -O2 -o "$OUT" "$HERE/mxnet_engine_dispatch.c" -L"$LIB" -l:libmxnet.so -Wl,-rpath,"$LIB"
export MXNET_ENGINE_TYPE=${MXNET_ENGINE_TYPE:-ThreadedEnginePerDevice}
export MXNET_CPU_WORKER_NTHREADS=$THREADS
export OMP_NUM_THREADS=1
echo "engine $MXNET_ENGINE_TYPE, $THREADS CPU workers, $REPS reps (median)"
exec "$OUT" "$REPS"
