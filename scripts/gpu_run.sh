#!/usr/bin/env bash
# One batched call on a lent GPU machine: install the carried wheels, then run each named step with its
# own time limit, logging to $OUT/logs/<step>.log; results/ and reports/ come back as one tarball.
# A failing step never stops the others.   usage: scripts/gpu_run.sh STEP:TIMEOUT_S:COMMAND ...
# Export OPTKIT_GIT_SHA=<the commit the tree holds> (and OPTKIT_GIT_DIRTY=0) first: the copied tree may carry no
# .git or a stale one, and rows must name the commit that ran.
# Wheels: .whl/ from ../shared/tools/gpu-wheels.sh; when the carried tree nears the device tool's 64 MiB,
# carry .whl-slim/ from scripts/slim_wheels.sh instead and link it as .whl in the unpacked tree.
# With .snap/ from scripts/gpu_snapshot.sh carried, the steps run in that packed commit, unpacked under /tmp,
# and rows name it. At most 8 files come back from $OUT: everything returns as results.tgz and logs.tgz.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT/logs"
if [ -f .snap/code.tgz ] && [ -f .snap/SHA ]; then
  mkdir -p /tmp/optkit-snap && tar xzf .snap/code.tgz -C /tmp/optkit-snap
  [ -d .whl ] && ln -sfn "$PWD/.whl" /tmp/optkit-snap/.whl
  export OPTKIT_GIT_SHA=$(cat .snap/SHA) OPTKIT_GIT_DIRTY=0
  cd /tmp/optkit-snap
  echo "running the packed commit ${OPTKIT_GIT_SHA:0:7}"
fi
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >"$OUT/logs/pip.log" 2>&1 || echo "wheel install failed (see pip.log)"
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv >"$OUT/logs/nvidia-smi.txt" 2>&1
for spec in "$@"; do
  name=${spec%%:*}; rest=${spec#*:}; limit=${rest%%:*}; cmd=${rest#*:}
  start=$(date +%s)
  timeout "$limit" bash -c "$cmd" >"$OUT/logs/$name.log" 2>&1
  rc=$?
  echo "== $name rc=$rc $(( $(date +%s) - start ))s"
  tail -n 8 "$OUT/logs/$name.log" | cut -c1-300
done
tar czf "$OUT/results.tgz" results reports 2>/dev/null
(cd "$OUT" && tar czf logs.tgz logs && rm -rf logs)
