"""COCO 2014 instance JSON -> semantic label PNGs (values 1..N in increasing category-id order, 0 background).

Deterministic paint order: an image's annotations are sorted by their ``area`` field, largest first, ties by
annotation id ascending, and painted in that order, so smaller objects end up on top of larger ones.
Crowd annotations (``iscrowd=1``) are handled by ``crowd``: ``"class"`` (default) paints them like any other
annotation, ``"void"`` paints them as 255 after every other annotation (ambiguous pixels are ignored by the
losses and metrics), ``"skip"`` ignores them.

Masks are decoded here without pycocotools: polygons fill the pixels whose centres (x + 0.5, y + 0.5) lie inside
(even-odd rule; an annotation's polygons are OR-ed), RLE (list or compressed string counts) is decoded exactly.
pycocotools rasterises polygons slightly differently along edges; ``backend="pycocotools"`` uses it instead.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import data_error
from .folds import IGNORE_INDEX
from .lists import write_list

CROWD_MODES = ("class", "void", "skip")
LIST_NAMES = {"train2014": "train", "val2014": "val"}


def decode_rle_string(s: str | bytes) -> list[int]:
    """Decode COCO's compressed RLE string (6-bit chunks offset by 48, runs after the second delta-coded)."""
    if isinstance(s, bytes):
        s = s.decode("ascii")
    counts: list[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def rle_to_mask(counts: Sequence[int], h: int, w: int) -> np.ndarray:
    """Runs alternate 0s and 1s (starting with 0s) over the column-major (Fortran-order) pixels."""
    counts = np.asarray(counts, dtype=np.int64)
    if counts.sum() != h * w or (counts < 0).any():
        raise ValueError(f"RLE counts sum to {int(counts.sum())}, expected {h}*{w}={h * w}")
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, counts)
    return flat.reshape(w, h).T


def polygon_to_mask(poly: Sequence[float], h: int, w: int) -> np.ndarray:
    """Fill one polygon [x0, y0, x1, y1, ...]: pixel (row r, col c) is set if (c + .5, r + .5) is inside."""
    pts = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
    mask = np.zeros((h, w), dtype=bool)
    if len(pts) < 3:
        return mask
    x0, y0 = pts[:, 0], pts[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    r_lo = max(int(np.floor(pts[:, 1].min() - 0.5)), 0)
    r_hi = min(int(np.ceil(pts[:, 1].max() + 0.5)), h)
    if r_hi <= r_lo:
        return mask
    yc = np.arange(r_lo, r_hi, dtype=np.float64)[:, None] + 0.5  # (R, 1) row centres
    crosses = ((y0 <= yc) & (y1 > yc)) | ((y1 <= yc) & (y0 > yc))  # half-open: each vertex counted once
    with np.errstate(divide="ignore", invalid="ignore"):
        xs = x0 + (yc - y0) * (x1 - x0) / (y1 - y0)
    xs = np.where(crosses, xs, np.inf)
    xs.sort(axis=1)
    n = crosses.sum(1)
    diff = np.zeros((r_hi - r_lo, w + 1), dtype=np.int32)
    for j in range(0, int(n.max()) if n.size else 0, 2):
        rows = np.flatnonzero(n > j + 1)
        if rows.size == 0:
            break
        # columns c with xa <= c + .5 < xb  ->  c in [ceil(xa - .5), ceil(xb - .5))
        start = np.clip(np.ceil(xs[rows, j] - 0.5), 0, w).astype(np.int64)
        stop = np.clip(np.ceil(xs[rows, j + 1] - 0.5), 0, w).astype(np.int64)
        diff[rows, start] += 1  # one pair per row per step: no repeated indices
        diff[rows, stop] -= 1
    mask[r_lo:r_hi] = np.cumsum(diff, axis=1)[:, :w] > 0
    return mask


def annotation_mask(segmentation, h: int, w: int, backend: str = "builtin") -> np.ndarray:
    """Decode one annotation's ``segmentation`` (polygon list, RLE dict with list or string counts)."""
    if backend == "pycocotools":
        from pycocotools import mask as mask_utils

        if isinstance(segmentation, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, h, w))
        elif isinstance(segmentation["counts"], list):
            rle = mask_utils.frPyObjects(segmentation, h, w)
        else:
            rle = segmentation
        return mask_utils.decode(rle).astype(bool)
    if isinstance(segmentation, list):
        mask = np.zeros((h, w), dtype=bool)
        for poly in segmentation:
            mask |= polygon_to_mask(poly, h, w)
        return mask
    size = segmentation.get("size", [h, w])
    if list(size) != [h, w]:
        raise ValueError(f"RLE size {size} differs from the image size {[h, w]}")
    counts = segmentation["counts"]
    if isinstance(counts, (str, bytes)):
        counts = decode_rle_string(counts)
    return rle_to_mask(counts, h, w)


def paint_order(anns: Sequence[dict]) -> list[dict]:
    """Largest ``area`` first, ties by annotation id ascending: later (smaller) instances paint on top."""
    return sorted(anns, key=lambda a: (-float(a.get("area", 0.0)), int(a["id"])))


def render_label(
    anns: Sequence[dict],
    h: int,
    w: int,
    cat_to_label: dict[int, int],
    crowd: str = "class",
    backend: str = "builtin",
) -> np.ndarray:
    """One image's semantic label map (uint8) from its instance annotations."""
    if crowd not in CROWD_MODES:
        raise ValueError(f"crowd must be one of {CROWD_MODES}, got {crowd!r}")
    label = np.zeros((h, w), dtype=np.uint8)
    crowds = [a for a in anns if a.get("iscrowd", 0)]
    if crowd != "class":
        anns = [a for a in anns if not a.get("iscrowd", 0)]
    for a in paint_order(anns):
        label[annotation_mask(a["segmentation"], h, w, backend)] = cat_to_label[int(a["category_id"])]
    if crowd == "void":
        for a in crowds:
            label[annotation_mask(a["segmentation"], h, w, backend)] = IGNORE_INDEX
    return label


def category_labels(categories: Sequence[dict]) -> dict[int, int]:
    """Category id -> label value 1..N in increasing category-id order."""
    return {int(c["id"]): i + 1 for i, c in enumerate(sorted(categories, key=lambda c: int(c["id"])))}


def _render_job(job: tuple) -> str:
    image, anns, cat_to_label, out_path, crowd, backend = job
    label = render_label(anns, int(image["height"]), int(image["width"]), cat_to_label, crowd, backend)
    Image.fromarray(label).save(out_path)
    return out_path


def convert_instances(
    instances_json: str | Path,
    out_dir: str | Path,
    crowd: str = "class",
    workers: int = 0,
    backend: str = "builtin",
    skip_existing: bool = False,
) -> list[tuple[str, str]]:
    """Write ``out_dir/<file stem>.png`` for every image of an instance JSON (images without annotations get
    all-zero labels). Returns (image file name, png path) pairs sorted by file name."""
    path = Path(instances_json)
    if not path.is_file():
        raise data_error("COCO instance annotation file not found", path, "coco")
    try:
        data = json.loads(path.read_text())
        images, annotations, categories = data["images"], data["annotations"], data["categories"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise data_error(f"not a COCO instance annotation file ({e})", path, "coco") from None
    cat_to_label = category_labels(categories)
    by_image: dict[int, list[dict]] = defaultdict(list)
    for a in annotations:
        by_image[int(a["image_id"])].append(a)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs, pairs = [], []
    for image in sorted(images, key=lambda im: im["file_name"]):
        png = out / (Path(image["file_name"]).stem + ".png")
        pairs.append((image["file_name"], str(png)))
        if skip_existing and png.is_file():
            continue
        jobs.append((image, by_image.get(int(image["id"]), []), cat_to_label, str(png), crowd, backend))
    if workers > 0:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_render_job, jobs, chunksize=32))
    else:
        for job in jobs:
            _render_job(job)
    return pairs


def coco_labels(
    root: str | Path,
    splits: Sequence[str] = ("train2014", "val2014"),
    annotations_dir: str | Path | None = None,
    crowd: str = "class",
    workers: int = 0,
    backend: str = "builtin",
    skip_existing: bool = False,
) -> dict[str, Path]:
    """Write ``ROOT/annotations/<split>/*.png`` from ``annotations/instances_<split>.json`` and the list files
    ``ROOT/lists/{train,val}.txt`` (lines ``train2014/x.jpg annotations/train2014/x.png``)."""
    root = Path(root)
    if not root.is_dir():
        raise data_error("COCO data root does not exist", root, "coco")
    ann_dir = Path(annotations_dir) if annotations_dir else root / "annotations"
    written = {}
    for split in splits:
        pairs = convert_instances(
            ann_dir / f"instances_{split}.json", root / "annotations" / split, crowd, workers, backend, skip_existing
        )
        lines = [(f"{split}/{name}", f"annotations/{split}/{Path(png).name}") for name, png in pairs]
        written[split] = write_list(lines, root / "lists" / f"{LIST_NAMES.get(split, split)}.txt")
    return written
