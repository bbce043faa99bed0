#!/usr/bin/env bash
# The full-size tuning figures (docs/BENCHMARKS.md section 5 for AnimateDiff, 7 for Wan 2.1 1.3B) in
# one call on a GPU machine that has torch, peft, transformers, onnx, onnxruntime, opencv and
# scikit-image but no internet:
#
#   bash jobs/benchmarks/gpu_fullsize.sh download WHEELS          # where pip reaches an index
#   bash jobs/benchmarks/gpu_fullsize.sh run WHEELS OUT [ARGS]    # on the GPU machine
#
# `download` fetches the few wheels the benchmark needs beyond that image, for CPython 3.12 on
# x86-64 Linux (7.5 MB; no Ray, MLflow or serving package). `run` installs them into a folder of
# their own (the image's packages stay as they are) and writes OUT/bench_fullsize.json after every
# measurement, so a run cut short keeps what it measured. ARGS go on to bench_fullsize.py (later
# ones win): e.g. `--device cpu --height 32 --width 32 --frames 2` tries the run on a CPU first.
set -euo pipefail
cd "$(dirname "$0")/../.."
WHEELS=(
  diffusers==0.42.1 insightface==2.1
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
)
# Every setting of the issue at the paper's size; torch.compile last (its compilation is slowest).
VARIANTS=no_ckpt,ckpt,ckpt_outer,ckpt_outer+channels_last,ckpt_outer+cfg_free,ckpt_outer+compile

case "${1:-}" in
  download)
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "${2:?usage: gpu_fullsize.sh download WHEELS}" "${WHEELS[@]}"
    ;;
  run)
    wheels=${2:?usage: gpu_fullsize.sh run WHEELS OUT [ARGS]} out=${3:?usage: gpu_fullsize.sh run WHEELS OUT [ARGS]}
    shift 3
    site=$(mktemp -d /tmp/pv-ray-site.XXXXXX)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$wheels"/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 jobs/benchmarks/bench_fullsize.py --out "$out" --device cuda --steps-timed 20 --warmup 3 \
      --variants "$VARIANTS" --batching-size 256 --batching-variant ckpt_outer "$@"
    # Wan 2.1 1.3B (a DiT): random weights in bf16, 480x832x33 with K=1, 256x256x17 with K=1 and K=4;
    # WAN_ARGS go on to bench_wan.py (e.g. "--device cpu --height 32 --width 32 --frames 5").
    python3 jobs/benchmarks/bench_wan.py --out "$out" --device cuda ${WAN_ARGS:-}
    ;;
  *)
    echo "usage: gpu_fullsize.sh download WHEELS | run WHEELS OUT [bench_fullsize.py ARGS]" >&2
    exit 2
    ;;
esac
