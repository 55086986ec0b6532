"""Per-fold list rules on hand-made label PNGs, list/voc-list parsing, the stats cache, clear DataErrors, and
(only when the real data is present) the protocol's Pascal-5i / COCO-20i counts."""

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from svf_fss.data import (
    DataError,
    PascalDataset,
    build_fold_list,
    load_stats,
    read_list,
    select_images,
    voc_lists,
    write_list,
)
from svf_fss.data import lists as lists_mod

pytestmark = pytest.mark.usefixtures("single_thread")

SIDE = 64  # 4096 pixels per image


def label_with(counts: dict[int, int], side: int = SIDE) -> np.ndarray:
    """A label map holding exactly ``counts[c]`` pixels of each value c (row-major runs), 0 elsewhere."""
    flat = np.zeros(side * side, dtype=np.uint8)
    pos = 0
    for c, n in counts.items():
        flat[pos : pos + n] = c
        pos += n
    assert pos <= flat.size
    return flat.reshape(side, side)


def make_voc(root: Path, images: dict[str, dict[int, int]], split: str = "train") -> Path:
    """Pascal-layout tree with one JPEG + label PNG per image and ROOT/lists/<split>.txt."""
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "SegmentationClassAug").mkdir(parents=True, exist_ok=True)
    pairs = []
    for name, counts in images.items():
        Image.new("RGB", (SIDE, SIDE), (90, 120, 30)).save(root / "JPEGImages" / f"{name}.jpg")
        Image.fromarray(label_with(counts)).save(root / "SegmentationClassAug" / f"{name}.png")
        pairs.append((f"JPEGImages/{name}.jpg", f"SegmentationClassAug/{name}.png"))
    write_list(pairs, root / "lists" / f"{split}.txt")
    return root


# Fold 0: novel = 1..5, base = 6..20.
TRAIN = {
    "exact2048": {6: 2048},
    "short2047": {6: 2047},
    "basenovel1px": {6: 3000, 1: 1},
    "twobase": {7: 2048, 8: 10, 255: 100},
    "novelonly": {2: 3000},
    "voidonly": {255: 500},
}


@pytest.fixture
def tiny(tmp_path):
    return make_voc(tmp_path / "voc", TRAIN)


def test_label_stats_count_pixels_at_original_resolution(tiny):
    stats = load_stats(tiny, "train", cache_dir=False)
    assert stats.ids == list(TRAIN)
    by_id = dict(zip(stats.ids, stats.counts, strict=True))
    assert by_id["twobase"] == {7: 2048, 8: 10}  # 0 and 255 are not classes
    assert by_id["voidonly"] == {}


def test_2048_rule_and_dataset_trick(tiny):
    stats = load_stats(tiny, "train", cache_dir=False)
    trick = build_fold_list(stats, 0, "train", trick=True)
    assert trick.ids == ["exact2048", "twobase"]  # 2047 fails; any novel pixel drops the image
    assert trick.class_images[6] == ["exact2048"] and trick.class_images[7] == ["twobase"]
    assert trick.class_images[8] == []  # 10 pixels: present, but never a support
    assert trick.query_classes["twobase"] == [7, 8]  # the query's class is drawn at any size
    no_trick = build_fold_list(stats, 0, "train", trick=False)
    assert no_trick.ids == ["exact2048", "basenovel1px", "twobase"]
    assert no_trick.query_classes["basenovel1px"] == [6]  # novel class 1 is background, never drawn
    assert not no_trick.trick


def test_test_lists_use_novel_classes_without_trick(tmp_path):
    images = {"n2b6": {2: 2100, 6: 1900}, "n3small": {3: 100, 4: 2100}, "b9": {9: 4000}}
    root = make_voc(tmp_path / "voc", images, "val")
    stats = load_stats(root, "val", cache_dir=False)
    fl = build_fold_list(stats, 0, "val")
    assert fl.ids == ["n2b6", "n3small"]  # base classes do not matter at test time
    assert fl.query_classes == {"n2b6": [2], "n3small": [3, 4]}
    assert fl.class_images[3] == [] and fl.class_images[4] == ["n3small"]
    assert build_fold_list(stats, 1, "val").ids == ["b9"]  # class 9 is novel in fold 1


def test_select_images_min_pixels_is_a_parameter():
    ids, present, per_class = select_images(["a", "b"], [{3: 10}, {3: 9}], classes=[3], min_pixels=10)
    assert ids == ["a"] and present == {"a": [3]} and per_class == {3: ["a"]}


def test_stats_cache_is_reused_and_keyed_by_list_content(tiny, monkeypatch):
    first = load_stats(tiny, "train")
    cached = list((tiny / "svf_fss_cache").glob("pascal_train_*.json"))
    assert len(cached) == 1

    def no_scan(*args, **kwargs):
        raise AssertionError("labels were scanned although the cache is valid")

    monkeypatch.setattr(lists_mod, "scan_labels", no_scan)
    again = load_stats(tiny, "train")
    assert again.counts == first.counts and again.key == first.key
    pairs = read_list(tiny / "lists" / "train.txt")[:3]
    write_list(pairs, tiny / "lists" / "train.txt")
    with pytest.raises(AssertionError, match="scanned"):
        load_stats(tiny, "train")  # a different list is a different key: it must rescan


def test_missing_root_list_and_files_raise_data_error(tmp_path, tiny):
    with pytest.raises(DataError, match=r"(?s)does not exist.*SegmentationClassAug"):
        load_stats(tmp_path / "nowhere", "train")
    with pytest.raises(DataError, match=r"(?s)list file not found.*lists/val.txt.*voc-lists"):
        load_stats(tiny, "val")
    (tiny / "SegmentationClassAug" / "twobase.png").unlink()
    with pytest.raises(DataError, match=r"1 files listed in .*missing.*SegmentationClassAug/twobase.png"):
        load_stats(tiny, "train", cache_dir=False)


def test_malformed_labels_and_lines_raise_data_error(tiny):
    bad = label_with({6: 2048, 21: 5})
    Image.fromarray(bad).save(tiny / "SegmentationClassAug" / "exact2048.png")
    with pytest.raises(DataError, match=r"(?s)values \[21\] outside 0..20.*exact2048.png.*SBD"):
        load_stats(tiny, "train", cache_dir=False)
    Image.new("RGB", (SIDE, SIDE), (128, 0, 0)).save(tiny / "SegmentationClassAug" / "exact2048.png")
    with pytest.raises(DataError, match=r"mode 'RGB'.*Colour-coded"):
        load_stats(tiny, "train", cache_dir=False)
    (tiny / "SegmentationClassAug" / "exact2048.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot decode label PNG"):
        load_stats(tiny, "train", cache_dir=False)
    (tiny / "lists" / "train.txt").write_text("JPEGImages/a.jpg\n")
    with pytest.raises(DataError, match=r"line 1 is 'JPEGImages/a\.jpg'"):
        load_stats(tiny, "train", cache_dir=False)


RELEASE_PREFIX = "/root/paddlejob/workspace/env_run/datsets/voc/VOC2012/"  # the SVF release's per-fold lists


def release_list(root: Path, names) -> Path:
    """A list written like the SVF release's fss_list/*/data_list_F.txt: absolute paths from another machine."""
    path = root / "data_list_0.txt"
    path.write_text(
        "".join(f"{RELEASE_PREFIX}JPEGImages/{n}.jpg {RELEASE_PREFIX}SegmentationClassAug/{n}.png\n" for n in names)
    )
    return path


def test_release_lists_with_absolute_prefixes_read_with_list_prefix(tiny):
    plain = load_stats(tiny, "train", cache_dir=False)
    listed = release_list(tiny, plain.ids)
    with pytest.raises(DataError, match=r"(?s)missing.*paths are absolute.*--list-prefix auto.*paddlejob") as err:
        load_stats(tiny, "train", list_file=listed, cache_dir=False)
    assert RELEASE_PREFIX in str(err.value)  # the hint names the exact prefix to strip
    for prefix in ("auto", RELEASE_PREFIX, RELEASE_PREFIX.rstrip("/")):
        stats = load_stats(tiny, "train", list_file=listed, cache_dir=False, list_prefix=prefix)
        assert stats.pairs == plain.pairs and stats.key == plain.key and stats.counts == plain.counts
    fold = build_fold_list(load_stats(tiny, "train", list_file=listed, list_prefix="auto", cache_dir=False), 0, "train")
    assert fold.ids == build_fold_list(plain, 0, "train").ids


def test_list_prefix_errors_name_the_line(tiny):
    listed = release_list(tiny, ["exact2048"])
    with pytest.raises(DataError, match=r"line 1: '/root/paddlejob.*' does not start with the list prefix '/data/'"):
        read_list(listed, list_prefix="/data/")
    listed.write_text("/somewhere/else/a.jpg /somewhere/else/a.png\n")
    with pytest.raises(DataError, match=r"line 1: '/somewhere/else/a\.jpg' holds none of the folders JPEGImages"):
        read_list(listed, list_prefix="auto")
    # COCO keeps everything from its image or annotation folder on
    listed.write_text("/mnt/coco/train2014/x.jpg /mnt/coco/annotations/train2014/x.png\n")
    assert read_list(listed, "coco", list_prefix="auto") == [("train2014/x.jpg", "annotations/train2014/x.png")]


def test_long_lines_are_cut_in_errors(tiny):
    listed = tiny / "sub_class_file_list_0.txt"
    line = "{1: [" + ", ".join(f"('{RELEASE_PREFIX}JPEGImages/{i}.jpg', 'x.png')" for i in range(600)) + "]}"
    listed.write_text(line + "\n")
    with pytest.raises(DataError) as err:
        read_list(listed)
    message = str(err.value)
    assert f"... ({len(line)} chars)" in message and "sub_class_file_list" in message and "data_list_F.txt" in message
    assert len(message.splitlines()[0]) < 600 < len(line)


def test_image_label_size_mismatch_is_reported_when_loading(tmp_path):
    root = make_voc(tmp_path / "voc", {"a": {1: 2048}, "b": {1: 2048}, "c": {1: 2048}}, "val")
    Image.new("RGB", (32, 48)).save(root / "JPEGImages" / "b.jpg")
    ds = PascalDataset(root, fold=0, split="val", shots=1, episodes=3, cache_dir=False)
    with pytest.raises(DataError, match=r"(?s)b.jpg is 32x48 but its label is 64x64"):
        for i in range(3):
            ds[i]


def test_duplicate_lines(tmp_path):
    path = tmp_path / "l.txt"
    path.write_text("J/a.jpg S/a.png\n\nJ/b.jpg S/b.png\nJ/a.jpg S/a.png\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert read_list(path) == [("J/a.jpg", "S/a.png"), ("J/b.jpg", "S/b.png")]
    assert any("1 duplicate" in str(w.message) for w in caught)
    path.write_text("J/a.jpg S/a.png\nJ/a.jpg S/other.png\n")
    with pytest.raises(DataError, match="twice with different labels"):
        read_list(path)


def test_voc_lists_merge_and_deduplicate(tmp_path):
    sets = tmp_path / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("2007_000001\n2007_000002\n")
    (sets / "val.txt").write_text("2007_000009\n")
    sbd = tmp_path / "train_noval.txt"
    sbd.write_text("2007_000002\n2008_000003\nJPEGImages/2008_000003.jpg SegmentationClassAug/2008_000003.png\n")
    train, val = voc_lists(tmp_path, sbd)
    assert [Path(i).stem for i, _ in train] == ["2007_000001", "2007_000002", "2008_000003"]
    assert train[0] == ("JPEGImages/2007_000001.jpg", "SegmentationClassAug/2007_000001.png")
    assert val == [("JPEGImages/2007_000009.jpg", "SegmentationClassAug/2007_000009.png")]
    with pytest.raises(DataError, match="id file not found"):
        voc_lists(tmp_path, tmp_path / "missing.txt")


PASCAL_ROOT = os.environ.get("SVF_FSS_PASCAL_ROOT")
COCO_ROOT = os.environ.get("SVF_FSS_COCO_ROOT")


@pytest.mark.slow
@pytest.mark.skipif(not PASCAL_ROOT, reason="real Pascal-5i not available: set SVF_FSS_PASCAL_ROOT to a VOC2012 root")
def test_real_pascal_counts_match_the_protocol():
    train = load_stats(PASCAL_ROOT, "train", "pascal", workers=os.cpu_count() or 1)
    val = load_stats(PASCAL_ROOT, "val", "pascal", workers=os.cpu_count() or 1)
    assert len(train.ids) == 5953 and len(val.ids) == 1449
    assert [len(build_fold_list(train, f, "train", True).ids) for f in range(4)] == [4208, 3726, 2752, 4510]
    assert [len(build_fold_list(train, f, "train", False).ids) for f in range(4)] == [4760, 4588, 4097, 5108]
    assert [len(build_fold_list(val, f, "val").ids) for f in range(4)] == [364, 445, 592, 336]


@pytest.mark.slow
@pytest.mark.skipif(not COCO_ROOT, reason="real COCO-20i not available: set SVF_FSS_COCO_ROOT to a COCO 2014 root")
def test_real_coco_trick_counts_match_the_protocol():
    train = load_stats(COCO_ROOT, "train", "coco", workers=os.cpu_count() or 1)
    assert [len(build_fold_list(train, f, "train", True).ids) for f in range(4)] == [21917, 41809, 43045, 44614]
