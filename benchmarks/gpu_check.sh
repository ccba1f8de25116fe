#!/usr/bin/env bash
# The GPU check (issue 23): the backend tests on the GPU, the detector's speed at VOC size on JAX and PyTorch
# (float32 and bfloat16, train.speed_paths off and on), the same ResNet-50-C4 from torchvision's parts for the ratio,
# and the long shapes training on JAX, in under 8 minutes on one H100 or H200. benchmarks/README.md, "The GPU
# check", says what each figure is.
#
#   bash benchmarks/gpu_check.sh               # on the GPU machine; results in $OUT (default ./gpu_check_out)
#   bash benchmarks/gpu_check.sh --dry-run     # the same at tiny sizes on a CPU (tests/test_gpu_check.py)
#
# Any other argument goes to benchmarks/gpu_check.py (--budget, --sections, --shapes-steps, --batch, --serial).
# Exit code 1: a section failed or ran out of time (the summary at the end says which).
# Where Keras or pycocotools is missing (the lent GPU machine has neither) and wheels lie in .whl/
# (benchmarks/gpu_wheels.sh downloads them), they are installed into a folder of their own first; nothing else is
# installed, and nothing is fetched (that machine has no network).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
OUT=${OUT:-$ROOT/gpu_check_out}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
start=$(date +%s)

if ! "$PYTHON" -c "import importlib.util as u, sys; sys.exit(not all(map(u.find_spec, ('keras', 'pycocotools'))))"
then
    if ls .whl/*.whl >/dev/null 2>&1; then
        SITE=${GPU_CHECK_SITE:-/tmp/frcnn-gpu-site}
        echo "gpu_check.sh: installing $(ls .whl/*.whl | wc -l) carried wheels into $SITE"
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            .whl/*.whl || { echo "gpu_check.sh: installing the wheels failed" >&2; exit 1; }
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "gpu_check.sh: Keras or pycocotools is missing and .whl/ holds no wheels (run benchmarks/gpu_wheels.sh" \
             "where there is a network)" >&2
    fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}

"$PYTHON" benchmarks/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
rc=${PIPESTATUS[0]}
echo "gpu_check.sh: $(( $(date +%s) - start )) s in all, exit code $rc" | tee -a "$OUT/gpu_check.log"
exit "$rc"
