#!/usr/bin/env bash
# The one-call GPU run (see bench/device/run.py for its parts). On the lent machine:
#   bash bench/device/run.sh [--budget-s 360]        # with the device tool: carry [".whl"]; OUT is set there
#   bash bench/device/run.sh --smoke                  # the same run, tiny, on a CPU (the rehearsal)
# The wheels of .whl/ (bench/device/prepare.sh; BOOTMAE_DEVICE_WHEELS names another folder) are
# installed first, into a private target put first on PYTHONPATH, exactly as on the device, in a
# smoke run too. The time budget counts from here, the install included.
set -euo pipefail
export BOOTMAE_DEVICE_T0=${BOOTMAE_DEVICE_T0:-$(date +%s.%N)}
cd "$(dirname "$0")/../.."
OUT=${OUT:-device_out}
mkdir -p "$OUT"
PY=$(command -v python3 || command -v python)
wheels=${BOOTMAE_DEVICE_WHEELS:-.whl}
# A failed install still comes back as a file: a minimal device_report.json (Python, the error).
install_failed() {
  "$PY" - "$OUT/device_report.json" "$1" "$wheels" <<'PY'
import json, platform, sys, time
out, error, wheels = sys.argv[1:4]
json.dump({"date": time.strftime("%Y-%m-%d"), "status": "install_failed", "python": platform.python_version(),
           "executable": sys.executable, "wheels": wheels, "error": error[-4000:], "parts": {}},
          open(out, "w"), indent=1)
PY
  echo "error: the wheels in $wheels did not install (see $OUT/device_report.json): ${1: -2000}" >&2
  exit 2
}
if compgen -G "$wheels/*.whl" >/dev/null; then
  deps=${BOOTMAE_DEVICE_DEPS:-/tmp/bootmae_device_deps}
  rm -rf "$deps"
  # a set made for another Python is refused by its tags before pip sees it (wheels.py --check)
  if ! err=$("$PY" bench/device/wheels.py --check "$wheels" 2>&1); then
    install_failed "$err"
  fi
  if ! err=$("$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$deps" "$wheels"/*.whl 2>&1); then
    install_failed "pip install: $err"
  fi
  export PYTHONPATH="$deps${PYTHONPATH:+:$PYTHONPATH}" PATH="$deps/bin:$PATH"
  # JIT-built ops (DeepSpeed's CPU op in a smoke run) of the carried packages apart from those of an
  # installed copy: each would rebuild the other's, their include paths differ
  export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-${deps}_extensions}
  echo "[device] installed $(ls "$wheels"/*.whl | wc -l) wheels into $deps in $("$PY" -c "import time; print(round(time.time() - $BOOTMAE_DEVICE_T0, 1))") s"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PY" bench/device/run.py --out "$OUT" "$@"
