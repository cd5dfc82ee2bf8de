#!/usr/bin/env bash
# Every speed benchmark, one after the other, each printing images/s of igcam and of its baseline measured in
# the same run, and their ratio. On one GPU: benchmarks/run_all.sh --device cuda (under 10 minutes);
# on a CPU, benchmarks/run_all.sh --device cpu takes longer with the GPU sizes, so it uses smaller ones.
set -euo pipefail
device=auto
if [[ "${1:-}" == "--device" ]]; then device="${2:?--device needs a value}"; fi
here="$(cd "$(dirname "$0")" && pwd)"
out="${TMPDIR:-/tmp}/igcam-bench-$$"
trap 'rm -rf "$out"' EXIT
python -c "import torch; print('torch', torch.__version__, '| cuda:', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
if [[ "$device" == cpu ]] || { [[ "$device" == auto ]] && ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; }; then
  python "$here/stages.py" --device cpu --images 16 --backbone resnet18 --seg-arch deeplabv3plus_resnet18 \
    --crop 256 --batch 8 --out "$out"
  python "$here/crf.py" --device cpu --images 16 --labels 21
  python "$here/crf.py" --device cpu --images 16 --labels 3
  python "$here/influence.py" --device cpu
else
  python "$here/stages.py" --device "$device" --images 96 --backbone resnet50 --out "$out"
  python "$here/crf.py" --device "$device" --images 64 --labels 21 --batch 16
  python "$here/crf.py" --device "$device" --images 64 --labels 3 --batch 16
  python "$here/make_cams.py" --device "$device" --backbone resnet50 --size 448 --images 64 --batch 16
  python "$here/influence.py" --device "$device"
fi
