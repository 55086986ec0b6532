"""COCO label PNGs from a tiny hand-written instance JSON: RLE/polygon decoding, paint order, crowd modes,
determinism, lists; and agreement with pycocotools when it is installed."""

import json
import random

import numpy as np
import pytest
from PIL import Image
from svf_fss.cli import main
from svf_fss.data import DataError, build_fold_list, load_stats
from svf_fss.data.coco_labels import (
    category_labels,
    coco_labels,
    convert_instances,
    decode_rle_string,
    polygon_to_mask,
    rle_to_mask,
)

pytestmark = pytest.mark.usefixtures("single_thread")

H, W = 10, 12


def encode_rle_string(counts):
    """Test-side encoder of COCO's compressed RLE (the inverse of what is tested)."""
    out = []
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if c & 0x10 else (x != 0)
            out.append(chr((c | 0x20 if more else c) + 48))
    return "".join(out)


def rect(r0, r1, c0, c1):
    m = np.zeros((H, W), dtype=bool)
    m[r0:r1, c0:c1] = True
    return m


ANNS = [
    # whole image, category 1 -> label 1
    {"id": 10, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 120.0,
     "segmentation": [[0, 0, 12, 0, 12, 10, 0, 10]]},
    # rows 2..5, cols 2..5, category 5 -> label 2
    {"id": 11, "image_id": 1, "category_id": 5, "iscrowd": 0, "area": 16.0,
     "segmentation": [[2, 2, 6, 2, 6, 6, 2, 6]]},
    # rows 4..7, cols 4..7 as uncompressed RLE, category 90 -> label 3; same area as id 11: paints after it
    {"id": 12, "image_id": 1, "category_id": 90, "iscrowd": 0, "area": 16.0,
     "segmentation": {"size": [H, W], "counts": [44, 4, 6, 4, 6, 4, 6, 4, 42]}},
    # crowd, rows 8..9, cols 0..3 as a compressed RLE string, category 5
    {"id": 13, "image_id": 1, "category_id": 5, "iscrowd": 1, "area": 8.0,
     "segmentation": {"size": [H, W], "counts": encode_rle_string([8, 2, 8, 2, 8, 2, 8, 2, 80])}},
]  # fmt: skip


def expected(crowd="class"):
    lab = np.ones((H, W), dtype=np.uint8)
    lab[rect(2, 6, 2, 6)] = 2
    lab[rect(4, 8, 4, 8)] = 3  # tie on area: the higher id paints last (on top)
    if crowd == "class":
        lab[rect(8, 10, 0, 4)] = 2
    elif crowd == "void":
        lab[rect(8, 10, 0, 4)] = 255
    return lab


def write_coco(root, anns=ANNS, split="val2014"):
    images = [
        {"id": 1, "file_name": f"COCO_{split}_000000000001.jpg", "height": H, "width": W},
        {"id": 2, "file_name": f"COCO_{split}_000000000002.jpg", "height": 6, "width": 8},
    ]
    cats = [{"id": 90, "name": "c90"}, {"id": 1, "name": "c1"}, {"id": 5, "name": "c5"}]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(exist_ok=True)
    for im in images:
        Image.new("RGB", (im["width"], im["height"])).save(root / split / im["file_name"])
    path = root / "annotations" / f"instances_{split}.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def test_rle_decoding_by_hand():
    # 2x3, column-major runs: 1 zero, 2 ones, 3 zeros -> pixels (1,0) and (0,1)
    assert rle_to_mask([1, 2, 3], 2, 3).tolist() == [[False, True, False], [True, False, False]]
    counts = [8, 2, 8, 2, 8, 2, 8, 2, 80, 0, 0, 123456, 7]
    assert decode_rle_string(encode_rle_string(counts)) == counts
    assert (rle_to_mask([44, 4, 6, 4, 6, 4, 6, 4, 42], H, W) == rect(4, 8, 4, 8)).all()
    with pytest.raises(ValueError, match="sum to"):
        rle_to_mask([1, 2], 2, 3)


def test_polygon_fills_pixel_centres():
    assert (polygon_to_mask([2, 2, 6, 2, 6, 6, 2, 6], H, W) == rect(2, 6, 2, 6)).all()
    # right triangle (0,0) (4,0) (0,4): centre (c+.5, r+.5) inside when c + r + 1 < 4
    tri = polygon_to_mask([0, 0, 4, 0, 0, 4], 5, 5)
    assert tri.sum() == 6 and tri[0, :3].all() and tri[1, :2].all() and tri[2, 0] and not tri[0, 3]
    # concave "U": the notch stays empty
    u = polygon_to_mask([0, 0, 6, 0, 6, 6, 4, 6, 4, 2, 2, 2, 2, 6, 0, 6], 6, 6)
    assert u[:2].all() and u[2:, :2].all() and u[2:, 4:].all() and not u[2:, 2:4].any()
    assert not polygon_to_mask([1, 1, 2, 2], 4, 4).any()  # degenerate: fewer than 3 points


def test_category_order_and_paint_order(tmp_path):
    assert category_labels([{"id": 90}, {"id": 1}, {"id": 5}]) == {1: 1, 5: 2, 90: 3}
    path = write_coco(tmp_path)
    pairs = convert_instances(path, tmp_path / "out")
    assert [p[0] for p in pairs] == ["COCO_val2014_000000000001.jpg", "COCO_val2014_000000000002.jpg"]
    lab = np.asarray(Image.open(tmp_path / "out" / "COCO_val2014_000000000001.png"))
    assert (lab == expected("class")).all()
    empty = np.asarray(Image.open(tmp_path / "out" / "COCO_val2014_000000000002.png"))
    assert empty.shape == (6, 8) and not empty.any()


@pytest.mark.parametrize("crowd", ["void", "skip"])
def test_crowd_modes(tmp_path, crowd):
    convert_instances(write_coco(tmp_path), tmp_path / "out", crowd=crowd)
    assert (np.asarray(Image.open(tmp_path / "out" / "COCO_val2014_000000000001.png")) == expected(crowd)).all()


def test_output_does_not_depend_on_annotation_order_or_workers(tmp_path):
    ref = tmp_path / "ref"
    convert_instances(write_coco(tmp_path / "a"), ref)
    shuffled = ANNS[:]
    random.Random(3).shuffle(shuffled)
    out = tmp_path / "shuffled"
    convert_instances(write_coco(tmp_path / "b", shuffled), out, workers=2)
    for png in sorted(ref.iterdir()):
        assert png.read_bytes() == (out / png.name).read_bytes()


def test_coco_labels_writes_lists_readable_by_the_coco_loader(tmp_path):
    root = tmp_path / "coco"
    write_coco(root)
    assert main(["coco-labels", "--root", str(root), "--splits", "val2014"]) == 0
    assert (root / "lists" / "val.txt").read_text().splitlines()[0] == (
        "val2014/COCO_val2014_000000000001.jpg annotations/val2014/COCO_val2014_000000000001.png"
    )
    stats = load_stats(root, "val", "coco", cache_dir=False)
    assert stats.counts[0] == {1: 120 - 28 - 8, 2: 12 + 8, 3: 16}
    fold0 = build_fold_list(stats, 0, "val", min_pixels=16)  # fold 0 novel: 1, 5, 9, ...
    assert fold0.ids == ["COCO_val2014_000000000001"] and fold0.query_classes[fold0.ids[0]] == [1]


def test_missing_or_malformed_json_is_a_data_error(tmp_path, capsys):
    with pytest.raises(DataError, match=r"(?s)instance annotation file not found.*coco-labels"):
        coco_labels(tmp_path, ["train2014"])
    bad = tmp_path / "annotations" / "instances_val2014.json"
    bad.parent.mkdir()
    bad.write_text("{}")
    assert main(["coco-labels", "--root", str(tmp_path), "--splits", "val2014"]) == 2
    err = capsys.readouterr().err
    assert "not a COCO instance annotation file" in err and "Traceback" not in err


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_agrees_with_pycocotools_when_installed():
    mask_utils = pytest.importorskip("pycocotools.mask", reason="pycocotools not installed (optional extra)")
    rng = np.random.default_rng(0)
    for _ in range(50):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        m = rng.random((h, w)) < rng.random()
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        assert (rle_to_mask(decode_rle_string(rle["counts"]), h, w) == m).all()
    diff = total = 0
    for _ in range(100):
        n = int(rng.integers(3, 12))
        ang, rad = np.sort(rng.uniform(0, 2 * np.pi, n)), rng.uniform(5, 30, n)
        poly = np.stack([60 + rad * np.cos(ang), 50 + rad * np.sin(ang)], 1).ravel().tolist()
        ref = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([poly], 100, 120))).astype(bool)
        diff += int((ref != polygon_to_mask(poly, 100, 120)).sum())
        total += int(ref.sum())
    assert diff / total < 0.02  # edges only: pycocotools rasterises at 5x and rounds differently
