"""Class names, fold splits and per-dataset settings for Pascal-5i, COCO-20i and the offline mini benchmark."""

from __future__ import annotations

from dataclasses import dataclass

PASCAL_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)  # fmt: skip

_FASHION = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankleboot")
# Mini benchmark: odd ids are Fashion-MNIST classes, even ids digits, so every fold mixes both sources.
MINI_CLASSES = tuple(name for k in range(10) for name in (_FASHION[k], f"digit{k}"))

IGNORE_INDEX = 255
MIN_PIXELS = 2 * 32 * 32  # a class qualifies for an image (list membership, supports) from this many pixels
PAPER_TEST_SEED = 321
PAPER_TEST_EPISODES = 1000
BAM_TEST_SEEDS = (510, 365, 382, 322, 988)


@dataclass(frozen=True)
class DatasetSpec:
    """What differs between datasets: classes, fold split, crop and test sizes, scale range."""

    name: str
    class_names: tuple[str, ...]
    num_folds: int
    split: str  # "consecutive" or "interleaved"
    train_size: int
    test_size: int
    scale: tuple[float, float]
    image_dirs: tuple[str, ...]  # folders under the root the list files point into (for error messages)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


_VOC_DIRS = ("JPEGImages", "SegmentationClassAug")
PASCAL = DatasetSpec("pascal", PASCAL_CLASSES, 4, "consecutive", 473, 473, (0.9, 1.1), _VOC_DIRS)
_COCO_DIRS = ("train2014", "val2014", "annotations")
COCO = DatasetSpec("coco", COCO_CLASSES, 4, "interleaved", 641, 641, (0.8, 1.25), _COCO_DIRS)
# The mini benchmark uses Pascal's on-disk layout, class count and consecutive fold split; only its names differ.
MINI = DatasetSpec("mini", MINI_CLASSES, 4, "consecutive", 473, 473, (0.9, 1.1), _VOC_DIRS)
SPECS = {s.name: s for s in (PASCAL, COCO, MINI)}


def get_spec(name: str | DatasetSpec) -> DatasetSpec:
    """Look up a DatasetSpec by name ('pascal', 'coco', 'mini')."""
    if isinstance(name, DatasetSpec):
        return name
    try:
        return SPECS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(SPECS)}") from None


def fold_classes(dataset: str | DatasetSpec, fold: int, split: str | None = None) -> tuple[list[int], list[int]]:
    """Return (base, novel) class ids (1-based) for ``fold``.

    ``split="consecutive"``: fold i novel = i*n+1 .. i*n+n (Pascal-5i; n = classes / folds).
    ``split="interleaved"``: fold i novel = {4k+i+1} (the COCO-20i split all three methods report).
    ``split=None`` uses the dataset's default.
    """
    spec = get_spec(dataset)
    split = split or spec.split
    n, folds = spec.num_classes, spec.num_folds
    if not 0 <= fold < folds:
        raise ValueError(f"fold must be in 0..{folds - 1}, got {fold}")
    per_fold = n // folds
    if split == "consecutive":
        novel = list(range(fold * per_fold + 1, fold * per_fold + per_fold + 1))
    elif split == "interleaved":
        novel = list(range(fold + 1, n + 1, folds))
    else:
        raise ValueError(f"split must be 'consecutive' or 'interleaved', got {split!r}")
    base = [c for c in range(1, n + 1) if c not in novel]
    return base, novel
