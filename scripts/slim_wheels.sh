#!/usr/bin/env bash
# Copy the GPU wheels (.whl/, from ../shared/tools/gpu-wheels.sh) to .whl-slim/ with bitsandbytes cut to
# the CUDA 13 and CPU libraries: the full wheel is 43 MB of per-CUDA-version builds, and the device tool
# carries at most 64 MiB together with the tracked tree (results/ and reports/ included). The lent GPUs'
# torch is a CUDA 13.0 build, so bitsandbytes loads libbitsandbytes_cuda130.so there.
#   usage: scripts/slim_wheels.sh [SRC=.whl] [DST=.whl-slim]; then carry DST and link it as .whl
set -euo pipefail
src=${1:-.whl}; dst=${2:-.whl-slim}
rm -rf "$dst"; mkdir -p "$dst"
for wheel in "$src"/*.whl; do
  case "$(basename "$wheel")" in
    bitsandbytes-*) ;;
    *) cp "$wheel" "$dst/"; continue ;;
  esac
  work=$(mktemp -d)
  (cd "$work" && unzip -q "$OLDPWD/$wheel" \
    && find bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*_cpu.so' ! -name '*_cuda13*.so' -delete \
    && python3 - <<'PY'
import glob, os
record = glob.glob("*.dist-info/RECORD")[0]
kept = [line for line in open(record) if os.path.exists(line.split(",")[0]) or line.startswith(record)]
open(record, "w").writelines(kept)
PY
  ) && (cd "$work" && zip -qr - .) > "$dst/$(basename "$wheel")"
  rm -rf "$work"
done
du -sh "$dst"
