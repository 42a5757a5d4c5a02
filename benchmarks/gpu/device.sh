#!/usr/bin/env bash
# On the lent GPU machine: install the wheels that benchmarks/gpu/wheels.py put in .whl/, then run the kit into $OUT,
# its log beside its results. The device tool's call (README.md beside this file):
#   run(command="bash benchmarks/gpu/device.sh", carry=[".whl"], timeout_s=600)
# Arguments go on to kit.py (e.g. --phases 1 2, --budget-s 300).
set -uo pipefail
: "${OUT:?OUT is the folder the device tool brings back}"
start=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
# MUJOCO_GL=disable: the kit renders nothing, and the image has no libEGL for MuJoCo to load (egl failed there)
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore MUJOCO_GL=disable
echo "wheels installed in $(( $(date +%s) - start )) s"
python3 benchmarks/gpu/kit.py --out "$OUT" "$@" 2>&1 | tee "$OUT/kit.log"
status=${PIPESTATUS[0]}
echo "device.sh done in $(( $(date +%s) - start )) s (kit exit $status)" | tee -a "$OUT/kit.log"
exit "$status"
