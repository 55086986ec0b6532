"""Fold splits: Pascal-5i consecutive blocks, COCO-20i interleaved (and its consecutive option)."""

import pytest
from svf_fss.data import COCO_CLASSES, MINI_CLASSES, PASCAL_CLASSES, fold_classes

pytestmark = pytest.mark.usefixtures("single_thread")


def test_pascal_folds_match_the_protocol_names():
    expected = {
        0: ["aeroplane", "bicycle", "bird", "boat", "bottle"],
        1: ["bus", "car", "cat", "chair", "cow"],
        2: ["diningtable", "dog", "horse", "motorbike", "person"],
        3: ["pottedplant", "sheep", "sofa", "train", "tvmonitor"],
    }
    for fold, names in expected.items():
        base, novel = fold_classes("pascal", fold)
        assert [PASCAL_CLASSES[c - 1] for c in novel] == names
        assert sorted(base + novel) == list(range(1, 21)) and len(base) == 15


def test_coco_interleaved_split():
    assert len(COCO_CLASSES) == 80
    for fold in range(4):
        base, novel = fold_classes("coco", fold)
        assert novel == [4 * k + fold + 1 for k in range(20)]
        assert sorted(base + novel) == list(range(1, 81))
    assert fold_classes("coco", 0)[1][:3] == [1, 5, 9]  # person, airplane, boat
    assert [COCO_CLASSES[c - 1] for c in fold_classes("coco", 0)[1][:3]] == ["person", "airplane", "boat"]


def test_coco_consecutive_option_and_novel_sets_partition_the_classes():
    assert fold_classes("coco", 1, "consecutive")[1] == list(range(21, 41))
    for split in ("consecutive", "interleaved"):
        novel = [c for f in range(4) for c in fold_classes("coco", f, split)[1]]
        assert sorted(novel) == list(range(1, 81))


def test_mini_uses_pascal_shape_and_mixes_sources_per_fold():
    assert len(MINI_CLASSES) == 20
    for fold in range(4):
        names = [MINI_CLASSES[c - 1] for c in fold_classes("mini", fold)[1]]
        assert any(n.startswith("digit") for n in names) and not all(n.startswith("digit") for n in names)


def test_bad_fold_or_split():
    with pytest.raises(ValueError, match="fold"):
        fold_classes("pascal", 4)
    with pytest.raises(ValueError, match="split"):
        fold_classes("coco", 0, "random")
    with pytest.raises(ValueError, match="unknown dataset"):
        fold_classes("voc", 0)
