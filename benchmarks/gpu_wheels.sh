#!/usr/bin/env bash
# Downloads into .whl/ (ignored by git) the wheels that benchmarks/gpu_check.sh installs on the lent GPU machine,
# which has Python 3.12 with JAX, PyTorch, torchvision, OpenCV, h5py, PyYAML, Pillow, NumPy, ml-dtypes, absl-py, rich,
# packaging, typing-extensions and TensorBoard, but no Keras or pycocotools, and no network. Each wheel's own needs
# (`unzip -p .whl/NAME-*.whl '*/METADATA' | grep ^Requires-Dist`) that the machine lacks are here too: Keras needs
# namex and optree. About 3.3 MB in all; the whole working tree travels to that machine, 64 MiB at most.
#
#   bash benchmarks/gpu_wheels.sh        # where pip can reach a package index
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEST="$ROOT/.whl"
# One version of each (two of one package stop the whole install there).
WHEELS=${GPU_WHEELS:-"keras==3.15.1 namex==0.1.0 optree==0.20.0 pycocotools==2.0.11"}
mkdir -p "$DEST"
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" $WHEELS
names=$(ls "$DEST"/*.whl | sed 's#.*/##; s/-.*//' | tr 'A-Z_' 'a-z-' | sort)
if [ -n "$(echo "$names" | uniq -d)" ]; then
    echo "gpu_wheels.sh: more than one version of $(echo "$names" | uniq -d | tr '\n' ' ')in $DEST: keep one" >&2
    exit 1
fi
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
echo "gpu_wheels.sh: $(ls "$DEST"/*.whl | wc -l) wheels, $(( total / 1024 )) KiB in $DEST"
if [ "$total" -gt $(( 40 * 1024 * 1024 )) ]; then
    echo "gpu_wheels.sh: over 40 MiB: the working tree that travels is limited to 64 MiB" >&2
    exit 1
fi
