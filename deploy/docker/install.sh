#!/usr/bin/env bash
# Installs mirrorgate into a fresh virtual environment.
#
# The Dockerfile's build stages run exactly this script, and
# tests/deploy/test_image_recipe.py runs it in a temporary folder and starts the server
# from the result, so the image recipe cannot rot unnoticed.
#
# usage: install.sh SRC_DIR PREFIX
#   SRC_DIR  a copy of the project (pyproject.toml, README.md, proxy/, gates/, storage/)
#   PREFIX   the virtual environment to create (the image uses /opt/mirrorgate)
#
# environment:
#   MIRRORGATE_TORCH        none | cpu | cuda   (default none)
#       cpu:  torch's CPU-only build from TORCH_INDEX_URL, so no CUDA libraries land in
#             the CPU image; cuda: the default PyPI build, which bundles the CUDA runtime.
#   MIRRORGATE_ONNXRUNTIME  none | cpu | gpu    (default cpu)
#       cpu: the [onnx] extra (onnxruntime); gpu: the [gpu] extra (onnxruntime-gpu; the
#       two ship the same module and must not be installed together); none: neither,
#       the slim gateway that serves `http` backends only.
#   The [postgres] extra (psycopg) is always installed: images talk to PostgreSQL.
#   TORCH_VERSION           torch version to pin (default 2.13.0)
#   TORCH_INDEX_URL         index holding the CPU builds (required when MIRRORGATE_TORCH=cpu)
#   ONNXRUNTIME_GPU_VERSION onnxruntime-gpu requirement (default >=1.17)
#   PYTHON                  interpreter that creates the venv (default python3)
set -euo pipefail

if [ "$#" -ne 2 ]; then
  echo "usage: install.sh SRC_DIR PREFIX" >&2
  exit 2
fi
src=$1
prefix=$2
torch_kind=${MIRRORGATE_TORCH:-none}
ort_kind=${MIRRORGATE_ONNXRUNTIME:-cpu}
torch_version=${TORCH_VERSION:-2.13.0}
python=${PYTHON:-python3}

if [ ! -f "$src/pyproject.toml" ]; then
  echo "install.sh: $src has no pyproject.toml" >&2
  exit 2
fi
case "$torch_kind" in none | cpu | cuda) ;; *)
  echo "install.sh: MIRRORGATE_TORCH must be none, cpu or cuda, not '$torch_kind'" >&2
  exit 2
  ;;
esac
case "$ort_kind" in none | cpu | gpu) ;; *)
  echo "install.sh: MIRRORGATE_ONNXRUNTIME must be none, cpu or gpu, not '$ort_kind'" >&2
  exit 2
  ;;
esac

if [ "$torch_kind" = cpu ] && [ -z "${TORCH_INDEX_URL:-}" ]; then
  echo "install.sh: MIRRORGATE_TORCH=cpu needs TORCH_INDEX_URL" >&2
  exit 2
fi

"$python" -m venv "$prefix"
pip=("$prefix/bin/python" -m pip --disable-pip-version-check)

# torch first, pinned: the [torch] extra only asks for a range, and an unpinned resolve
# picks the multi-GB CUDA build even for the CPU image.
extras="postgres"
case "$torch_kind" in
  cpu)
    "${pip[@]}" install --index-url "$TORCH_INDEX_URL" "torch==$torch_version"
    extras="$extras,torch"
    ;;
  cuda)
    "${pip[@]}" install "torch==$torch_version"
    extras="$extras,torch"
    ;;
esac
case "$ort_kind" in
  cpu) extras="$extras,onnx" ;;
  gpu)
    "${pip[@]}" install "onnxruntime-gpu${ONNXRUNTIME_GPU_VERSION:->=1.17}"
    extras="$extras,gpu"
    ;;
esac

# A regular (non-editable) install: the image must not depend on the source tree.
"${pip[@]}" install "${src}[${extras}]"

# Fail the build now, not at the first request, when the entry point is broken.
"$prefix/bin/mirrorgate" --version
