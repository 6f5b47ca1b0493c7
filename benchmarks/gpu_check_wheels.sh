#!/usr/bin/env bash
# The Python packages benchmarks/gpu_check.py needs that the lent GPU machine's image lacks (it has torch,
# transformers, accelerate, safetensors, pytest, jaxtyping, rich, ninja and nvcc, but no network), fetched HERE
# as wheels into .whl/ (in .gitignore) so the run can carry them. About 13 MB. USD export is left out (usd-core
# is a large wheel): the bake step then bakes PLY only and says so. See docs/benchmarks.md, "GPU check".
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-.venv/bin/python}"
diffusers="$("$py" -c 'import diffusers; print(diffusers.__version__)')"   # the version the suite tested
rm -rf .whl && mkdir .whl
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "diffusers==$diffusers" "gsplat>=1.5,<1.6" "plyfile>=1.0" "importlib_metadata"
ls -la .whl
