#!/usr/bin/env bash
# The one-call GPU run (see bench/device/run.py for its parts). On the lent machine:
#   bash bench/device/run.sh                 # with the device tool: carry [".whl"], OUT is set there
#   bash bench/device/run.sh --smoke         # the same script on a CPU with tiny sizes (CI runs this)
# On the device it first installs the wheels of .whl/ (bench/device/prepare.sh, Python 3.12) into a
# private target; a smoke run uses the packages of the machine it runs on.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-device_out}
mkdir -p "$OUT"
PY=$(command -v python3 || command -v python)
smoke=0
for arg in "$@"; do [ "$arg" = "--smoke" ] && smoke=1; done
if [ "$smoke" = 0 ] && compgen -G ".whl/*.whl" >/dev/null; then
  deps=${BOOTMAE_DEVICE_DEPS:-/tmp/bootmae_device_deps}
  "$PY" -m pip install -q --no-index --no-deps --target "$deps" .whl/*.whl
  export PYTHONPATH="$deps${PYTHONPATH:+:$PYTHONPATH}"
  echo "[device] installed $(ls .whl | wc -l) wheels into $deps"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PY" bench/device/run.py --out "$OUT" "$@"
