"""List files, per-image class statistics and the per-fold lists (2048-pixel rule, base/novel, dataset trick)."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .errors import data_error
from .folds import MIN_PIXELS, DatasetSpec, fold_classes, get_spec
from .io import label_class_counts, read_label

CACHE_FORMAT = "svf-fss-label-stats/1"
SPLITS = ("train", "val")


def default_list_file(root: str | Path, split: str) -> Path:
    """Where a dataset root keeps its list files: ``ROOT/lists/{train,val}.txt``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return Path(root) / "lists" / f"{split}.txt"


def check_root(root: str | Path, spec: DatasetSpec) -> Path:
    """Raise DataError unless ``root`` is an existing directory."""
    root = Path(root)
    if not root.is_dir():
        raise data_error(f"{spec.name} data root does not exist or is not a directory", root, spec.name)
    return root


PREVIEW_CHARS = 200


def shorten(text: str, limit: int = PREVIEW_CHARS) -> str:
    """``text`` cut to ``limit`` characters for an error message, with its full length: ``"abc... (65872 chars)"``."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def strip_list_prefix(path: str, prefix: str | None, spec: DatasetSpec) -> str:
    """A list path made relative to the data root.

    ``prefix=None`` keeps it as written. ``"auto"`` drops everything before the first of the dataset's folders
    (``JPEGImages``/``SegmentationClassAug`` for Pascal, ``train2014``/``val2014``/``annotations`` for COCO), so
    ``/root/paddlejob/.../VOC2012/JPEGImages/x.jpg`` becomes ``JPEGImages/x.jpg``. Any other string must start the
    path and is removed (``"/root/paddlejob/workspace/env_run/datsets/voc/VOC2012/"``). Raises ``ValueError``
    saying what did not fit.
    """
    if prefix is None:
        return path
    if prefix == "auto":
        parts = path.replace("\\", "/").split("/")
        for index, part in enumerate(parts):
            if part in spec.image_dirs:
                return "/".join(parts[index:])
        raise ValueError(f"{shorten(path)!r} holds none of the folders {', '.join(spec.image_dirs)}")
    if not path.startswith(prefix):
        raise ValueError(f"{shorten(path)!r} does not start with the list prefix {prefix!r}")
    return path[len(prefix) :].lstrip("/")


def read_list(
    list_file: str | Path, dataset: str | DatasetSpec = "pascal", list_prefix: str | None = None
) -> list[tuple[str, str]]:
    """Read a list file: one ``image_path label_path`` pair per line, relative to the data root.

    ``list_prefix`` reads lists written with absolute paths, such as the per-fold ``data_list_F.txt`` of the SVF
    release (``/root/paddlejob/.../VOC2012/JPEGImages/x.jpg ...``): ``"auto"`` or the prefix to strip (see
    :func:`strip_list_prefix`). Exact duplicate lines are dropped (first kept, with a warning); the same image with
    two labels is an error. Long lines are cut to 200 characters in error messages.
    """
    spec = get_spec(dataset)
    path = Path(list_file)
    if not path.is_file():
        raise data_error("list file not found", path, spec.name)
    pairs: list[tuple[str, str]] = []
    seen: dict[str, str] = {}
    duplicates = 0
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            hint = ""
            if line.startswith("{"):
                hint = (
                    " (this looks like a PFENet/SVF-release sub_class_file_list, a Python dict of class -> image "
                    "pairs; give its data_list_F.txt instead)"
                )
            raise data_error(f"line {n} is {shorten(raw)!r}; expected 'IMAGE_PATH LABEL_PATH'{hint}", path, spec.name)
        try:
            image, label = (strip_list_prefix(part, list_prefix, spec) for part in parts)
        except ValueError as e:
            raise data_error(f"line {n}: {e}", path, spec.name) from None
        key = image_id(image)
        if key in seen:
            if seen[key] == label:
                duplicates += 1
                continue
            raise data_error(f"line {n}: image id {key!r} appears twice with different labels", path, spec.name)
        seen[key] = label
        pairs.append((image, label))
    if not pairs:
        raise data_error("list file is empty", path, spec.name)
    if duplicates:
        warnings.warn(f"{path}: dropped {duplicates} duplicate lines", stacklevel=2)
    return pairs


def write_list(pairs: Iterable[tuple[str, str]], path: str | Path) -> Path:
    """Write ``image label`` pairs as a list file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{image} {label}\n" for image, label in pairs))
    return path


def image_id(image_path: str) -> str:
    """An image's id: its file name without extension (unique within a list)."""
    return Path(image_path).stem


@dataclass
class LabelStats:
    """Per-image class pixel counts of one list (computed once, cached as JSON)."""

    dataset: str
    root: Path
    pairs: list[tuple[str, str]]
    counts: list[dict[int, int]]  # class id -> pixels at original resolution, classes 1..N only
    key: str = ""
    ids: list[str] = field(init=False)
    index: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.ids = [image_id(image) for image, _ in self.pairs]
        self.index = {k: i for i, k in enumerate(self.ids)}

    def image_path(self, key: str) -> Path:
        return self.root / self.pairs[self.index[key]][0]

    def label_path(self, key: str) -> Path:
        return self.root / self.pairs[self.index[key]][1]


def list_key(pairs: Sequence[tuple[str, str]], num_classes: int) -> str:
    """Content hash of a list (and class count): names the stats cache and stamps episode tables."""
    h = hashlib.sha1(f"{CACHE_FORMAT} {num_classes}\n".encode())
    for image, label in pairs:
        h.update(f"{image} {label}\n".encode())
    return h.hexdigest()


def check_files(root: Path, pairs: Sequence[tuple[str, str]], spec: DatasetSpec, list_file: Path | None) -> None:
    """Raise one DataError naming the first missing files (and how many are missing) of a list."""
    missing = [p for pair in pairs for p in pair if not (root / p).is_file()]
    if missing:
        shown = ", ".join(shorten(p) for p in missing[:5])
        where = f" listed in {list_file}" if list_file else ""
        raise data_error(
            f"{len(missing)} files{where} are missing under {root} (first: {shown}); "
            f"expected folders: {', '.join(spec.image_dirs)}{_absolute_hint(missing[0], spec)}",
            root / missing[0],
            spec.name,
        )


def _absolute_hint(path: str, spec: DatasetSpec) -> str:
    """For a missing absolute list path: how to read it under the data root instead."""
    if not Path(path).is_absolute():
        return ""
    try:
        tail = strip_list_prefix(path, "auto", spec)
    except ValueError:
        return "; the list's paths are absolute: give paths relative to the data root"
    prefix = path[: len(path) - len(tail)]
    return (
        f"; the list's paths are absolute (written on another machine?): to read them under the data root, strip "
        f"their prefix with --list-prefix auto or --list-prefix {shorten(prefix)!r} (Python: list_prefix='auto')"
    )


def _scan_one(args: tuple[str, int, str]) -> dict[int, int]:
    path, num_classes, dataset = args
    return label_class_counts(read_label(path, num_classes, dataset), num_classes)


def scan_labels(
    root: str | Path, pairs: Sequence[tuple[str, str]], dataset: str | DatasetSpec, workers: int = 0
) -> list[dict[int, int]]:
    """Count the pixels of every class in every label of ``pairs`` (``workers`` > 0 uses processes)."""
    spec = get_spec(dataset)
    jobs = [(str(Path(root) / label), spec.num_classes, spec.name) for _, label in pairs]
    if workers > 0:
        with ProcessPoolExecutor(workers) as pool:
            return list(pool.map(_scan_one, jobs, chunksize=64))
    return [_scan_one(job) for job in jobs]


def load_stats(
    root: str | Path,
    split: str,
    dataset: str | DatasetSpec = "pascal",
    list_file: str | Path | None = None,
    cache_dir: str | Path | bool | None = None,
    workers: int = 0,
    list_prefix: str | None = None,
) -> LabelStats:
    """Read a split's list, check its files and return its LabelStats, using a JSON cache when present.

    ``cache_dir=None`` caches under ``ROOT/svf_fss_cache`` when writable; ``False`` disables the cache.
    The cache is keyed by the list's content (after ``list_prefix``, see :func:`read_list`); delete it after
    changing label files in place.
    """
    spec = get_spec(dataset)
    root = check_root(root, spec)
    list_path = Path(list_file) if list_file is not None else default_list_file(root, split)
    pairs = read_list(list_path, spec, list_prefix)
    check_files(root, pairs, spec, list_path)
    key = list_key(pairs, spec.num_classes)
    cache = None
    if cache_dir is not False:
        cache = Path(cache_dir) if cache_dir not in (None, True) else root / "svf_fss_cache"
        cache = cache / f"{spec.name}_{split}_{key[:16]}.json"
        if cache.is_file():
            data = json.loads(cache.read_text())
            if data.get("format") == CACHE_FORMAT and data.get("key") == key:
                counts = [{int(c): n for c, n in d.items()} for d in data["counts"]]
                return LabelStats(spec.name, root, pairs, counts, key)
    counts = scan_labels(root, pairs, spec, workers)
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({"format": CACHE_FORMAT, "key": key, "list": str(list_path), "counts": counts}))
            tmp.replace(cache)
        except OSError as e:
            warnings.warn(f"could not write the label-stats cache {cache} ({e}); recomputed next time", stacklevel=2)
    return LabelStats(spec.name, root, pairs, counts, key)


@dataclass
class FoldList:
    """The images of one fold and split, and for each class the images it qualifies in.

    ``ids``: list images (list order) holding at least one ``classes`` member with >= min_pixels pixels.
    ``query_classes[id]``: the ``classes`` present in that image at any size (the query's class is drawn here).
    ``class_images[c]``: images where class c covers >= min_pixels (support candidates for c).
    """

    dataset: str
    fold: int
    split: str
    trick: bool
    classes: list[int]
    ids: list[str]
    query_classes: dict[str, list[int]]
    class_images: dict[int, list[str]]
    min_pixels: int = MIN_PIXELS
    key: str = ""

    def counts(self) -> dict[int, int]:
        """Number of qualifying images per class."""
        return {c: len(v) for c, v in self.class_images.items()}


def select_images(
    ids: Sequence[str],
    counts: Sequence[dict[int, int]],
    classes: Sequence[int],
    exclude: Sequence[int] = (),
    min_pixels: int = MIN_PIXELS,
) -> tuple[list[str], dict[str, list[int]], dict[int, list[str]]]:
    """The per-fold list rule.

    An image holding any pixel of an ``exclude`` class is dropped (the dataset trick passes the novel classes).
    A class qualifies for an image when it covers >= ``min_pixels`` pixels; an image is kept when one of
    ``classes`` qualifies. Returns (kept ids, classes present per kept id, qualifying ids per class).
    """
    wanted, excluded = set(classes), set(exclude)
    kept: list[str] = []
    present: dict[str, list[int]] = {}
    per_class: dict[int, list[str]] = {c: [] for c in sorted(wanted)}
    for key, cnt in zip(ids, counts, strict=True):
        if excluded and not excluded.isdisjoint(cnt):
            continue
        qualified = [c for c in sorted(cnt) if c in wanted and cnt[c] >= min_pixels]
        if not qualified:
            continue
        kept.append(key)
        present[key] = [c for c in sorted(cnt) if c in wanted]
        for c in qualified:
            per_class[c].append(key)
    return kept, present, per_class


def build_fold_list(
    stats: LabelStats,
    fold: int,
    split: str,
    trick: bool = True,
    min_pixels: int = MIN_PIXELS,
    fold_split: str | None = None,
) -> FoldList:
    """The fold's list for ``split``: 'train' uses base classes (dropping images with novel ones when ``trick``),
    'val' uses novel classes (the trick never applies to testing)."""
    base, novel = fold_classes(stats.dataset, fold, fold_split)
    if split == "train":
        classes, exclude = base, (novel if trick else [])
    elif split == "val":
        classes, exclude = novel, []
    else:
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    ids, present, per_class = select_images(stats.ids, stats.counts, classes, exclude, min_pixels)
    return FoldList(
        stats.dataset, fold, split, trick and split == "train", classes, ids, present, per_class, min_pixels, stats.key
    )


def write_fold_list(fold_list: FoldList, stats: LabelStats, out_dir: str | Path) -> tuple[Path, Path]:
    """Write a fold list as ``{split}_fold{f}[_notrick].txt`` (list-file format) plus a JSON class -> ids map."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if fold_list.split == "val" or fold_list.trick else "_notrick"
    stem = f"{fold_list.split}_fold{fold_list.fold}{suffix}"
    txt = write_list([stats.pairs[stats.index[k]] for k in fold_list.ids], out / f"{stem}.txt")
    js = out / f"{stem}_classes.json"
    js.write_text(json.dumps({str(c): v for c, v in fold_list.class_images.items()}, indent=0))
    return txt, js


def voc_lists(
    voc_root: str | Path, extra_train_ids: str | Path | None = None
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Pascal-5i list pairs from VOC2012 ``ImageSets/Segmentation/{train,val}.txt`` ids.

    Train = VOC train + ``extra_train_ids`` (SBD's train_noval, 5,623 lines of ids or of list-file pairs such as
    PFENet's ``sbd_data.txt``), duplicates dropped, order kept (5,953 lines with the standard files).
    Val = VOC val (1,449 lines).
    """
    root = Path(voc_root)

    def ids(path: Path) -> list[str]:
        if not path.is_file():
            raise data_error("id file not found", path, "pascal")
        return [Path(line.split()[0]).stem for line in path.read_text().splitlines() if line.strip()]

    def pair(i: str) -> tuple[str, str]:
        return f"JPEGImages/{i}.jpg", f"SegmentationClassAug/{i}.png"

    sets = root / "ImageSets" / "Segmentation"
    train = ids(sets / "train.txt") + (ids(Path(extra_train_ids)) if extra_train_ids else [])
    train_pairs = list(dict.fromkeys(pair(i) for i in train))
    val_pairs = list(dict.fromkeys(pair(i) for i in ids(sets / "val.txt")))
    return train_pairs, val_pairs
