"""One exception type for every data problem, with messages that say what to download and where to put it."""

from __future__ import annotations

from pathlib import Path

PASCAL_HELP = (
    "Pascal-5i needs VOC2012 JPEGImages/ (http://host.robots.ox.ac.uk/pascal/VOC/voc2012/) and the SBD-augmented "
    "labels SegmentationClassAug/*.png (values 0..20, 255 = void) in the same data root, plus list files "
    "lists/train.txt and lists/val.txt with lines 'JPEGImages/x.jpg SegmentationClassAug/x.png' "
    "(`svf-fss voc-lists` writes them from VOC's ImageSets and SBD's train_noval ids)."
)
COCO_HELP = (
    "COCO-20i needs COCO 2014 train2014/ and val2014/ images (https://cocodataset.org/#download) and label PNGs "
    "annotations/{train2014,val2014}/*.png (values 1..80, 0 = background, 255 = void) plus lists/train.txt and "
    "lists/val.txt; `svf-fss coco-labels --root ROOT` writes the PNGs and the lists from the official "
    "annotations/instances_{train,val}2014.json."
)
MINI_HELP = "The mini benchmark is generated offline: `svf-fss make-mini OUT_DIR`."
FASHION_HELP = (
    "The mini benchmark pastes Fashion-MNIST objects: install the Debian package `dataset-fashion-mnist` "
    "(apt-get install -y dataset-fashion-mnist; files in /usr/share/datasets/fashion-mnist/) or point "
    "--fashion-dir / SVF_FSS_FASHION_MNIST at a folder holding t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz."
)

HELP = {"pascal": PASCAL_HELP, "coco": COCO_HELP, "mini": MINI_HELP}


class DataError(RuntimeError):
    """Missing or malformed data. The message names the file and what to download."""


def data_error(problem: str, path: str | Path | None = None, dataset: str | None = None) -> DataError:
    """Build a DataError: the problem, the file it concerns and the download help for ``dataset``."""
    message = problem if path is None else f"{problem} (file: {path})"
    if dataset is not None and dataset in HELP:
        message += "\n" + HELP[dataset]
    return DataError(message)
