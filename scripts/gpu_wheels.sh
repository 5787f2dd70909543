#!/usr/bin/env bash
# Fetch the wheels the GPU check (scripts/gpu_check.py) needs on the device machine, check that they and the working
# tree that travels with them fit its 64 MiB limit, and print the install line the check starts with.
#
# The device's python3 (3.12, manylinux x86_64) already has torch (CUDA), torchvision, transformers, accelerate, peft,
# numpy, pandas, pyarrow, xxhash, fsspec, huggingface-hub, tokenizers, safetensors, scipy, scikit-image,
# scikit-learn, opencv-python-headless, matplotlib and sentencepiece. Missing there, so carried: trl; datasets and
# the two of its dependencies it lacks (dill, multiprocess); pysodmetrics and pycocotools (the metrics). Versions are
# the ones this project's .venv tests with. They are installed with --no-deps: pins such as pysodmetrics'
# numpy<2.3.5 are not enforced against the device's own packages (docs/gpu_check.md says what was checked).
#
#   scripts/gpu_wheels.sh                 # into .gpu-wheels/ (gitignored: name it in the run's `carry`)
#   EXTRA="pyarrow==26.0.1" scripts/gpu_wheels.sh   # add wheels, e.g. if a device package proves too old
set -euo pipefail
cd "$(dirname "$0")/.."

DEST=${DEST:-.gpu-wheels}
VENV_PY=${VENV_PY:-.venv/bin/python}
LIMIT_MIB=64
PACKAGES=(trl datasets dill multiprocess pysodmetrics pycocotools)

if [[ ! -x $VENV_PY ]]; then
    echo "error: $VENV_PY not found; run 'make install' first (the wheel versions are read from it)" >&2
    exit 1
fi
specs=()
for name in "${PACKAGES[@]}"; do
    specs+=("$name==$("$VENV_PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$name")")
done
# shellcheck disable=SC2206  # EXTRA is a space-separated list of requirement specifiers
specs+=(${EXTRA:-})

rm -rf "$DEST"
mkdir -p "$DEST"
python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$DEST" \
    --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    "${specs[@]}" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)

# What travels: tracked files, untracked files git does not ignore, and the carried wheels.
sizes=$(git ls-files -z --cached --others --exclude-standard | python3 -c '
import os, sys
paths = [p for p in sys.stdin.read().split("\0") if p and os.path.isfile(p)]
print(sum(os.path.getsize(p) for p in paths))')
wheels=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
total=$((sizes + wheels))
ls -l "$DEST"
printf 'wheels %.1f MiB + working tree %.1f MiB = %.1f MiB of the %d MiB limit\n' \
    "$(bc -l <<< "$wheels / 1048576")" "$(bc -l <<< "$sizes / 1048576")" "$(bc -l <<< "$total / 1048576")" "$LIMIT_MIB"
if ((total > LIMIT_MIB * 1048576)); then
    echo "error: over the limit; untracked files that travel:" >&2
    git ls-files --others --exclude-standard --directory | head -20 >&2
    exit 1
fi
echo "install line (first in the run's command; carry [\"$DEST\"]):"
echo "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $DEST/*.whl && export PYTHONPATH=/tmp/site:\$PWD || exit"
