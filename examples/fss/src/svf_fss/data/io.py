"""Reading images and label maps, with DataError instead of deep decoder errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import data_error


def read_label(path: str | Path, num_classes: int, dataset: str | None = None) -> np.ndarray:
    """Read a label PNG as a uint8 (H, W) array of class indices; values must be 0..num_classes or 255."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16"):
                raise data_error(
                    f"label map has mode {im.mode!r}; expected a single-channel index PNG (mode L or P). "
                    "Colour-coded labels (e.g. VOC's SegmentationClass saved as RGB) are not class indices",
                    path,
                    dataset,
                )
            label = np.asarray(im)
    except FileNotFoundError:
        raise data_error("label file not found", path, dataset) from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise data_error(f"cannot decode label PNG ({e})", path, dataset) from None
    if label.ndim != 2:
        raise data_error(f"label map has shape {label.shape}; expected (H, W)", path, dataset)
    if label.dtype != np.uint8:
        if label.min() < 0 or label.max() > 255:
            raise data_error(f"label values span {label.min()}..{label.max()}; expected 0..255", path, dataset)
        label = label.astype(np.uint8)
    check_label_values(label, num_classes, path, dataset)
    return label


def check_label_values(label: np.ndarray, num_classes: int, path: str | Path, dataset: str | None = None) -> None:
    """Raise DataError if ``label`` holds values other than 0..num_classes and 255."""
    counts = np.bincount(label.ravel(), minlength=256)
    bad = np.flatnonzero(counts[num_classes + 1 : 255]) + num_classes + 1
    if bad.size:
        raise data_error(
            f"label map holds values {bad[:10].tolist()} outside 0..{num_classes} and 255 (void)", path, dataset
        )


def label_class_counts(label: np.ndarray, num_classes: int) -> dict[int, int]:
    """Pixel count of every class 1..num_classes present in ``label`` (0 and 255 excluded)."""
    counts = np.bincount(label.ravel(), minlength=256)[1 : num_classes + 1]
    return {int(c) + 1: int(counts[c]) for c in np.flatnonzero(counts)}


def read_image(path: str | Path, dataset: str | None = None) -> np.ndarray:
    """Read an image as an RGB uint8 (H, W, 3) array (grayscale JPEGs are converted)."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise data_error("image file not found", path, dataset) from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise data_error(f"cannot decode image ({e})", path, dataset) from None
