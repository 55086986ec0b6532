"""The offline mini benchmark: Pascal layout, values, determinism, per-fold counts, and the real Pascal-5i path
(lists, trick, episodes, test resize, metrics) end to end on it."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from svf_fss.data import (
    FSSMeter,
    MiniDataset,
    PascalDataset,
    build_fold_list,
    collate_episodes,
    load_stats,
    read_list,
    to_original_size,
)
from svf_fss.data.mini import load_fashion, make_mini
from torch.utils.data import DataLoader

pytestmark = pytest.mark.usefixtures("single_thread")


def test_layout_and_label_values(mini_root):
    train, val = read_list(mini_root / "lists" / "train.txt"), read_list(mini_root / "lists" / "val.txt")
    assert len(train) == 320 and len(val) == 160
    assert train[0] == ("JPEGImages/train_00000.jpg", "SegmentationClassAug/train_00000.png")
    values = np.zeros(256, dtype=np.int64)
    for image, label in train[:40] + val[:40]:
        lab = np.asarray(Image.open(mini_root / label))
        with Image.open(mini_root / image) as im:
            assert im.mode == "RGB" and im.size == (lab.shape[1], lab.shape[0])
        assert min(lab.shape) >= 96 and max(lab.shape) <= 160
        values += np.bincount(lab.ravel(), minlength=256)
    present = set(np.flatnonzero(values).tolist())
    assert present <= set(range(21)) | {255} and {0, 255} <= present and len(present - {0, 255}) == 20
    assert 0.01 < values[255] / values.sum() < 0.2  # a thin void band, not void blobs


def test_every_fold_allows_five_shot_for_every_class(mini_root):
    train, val = load_stats(mini_root, "train"), load_stats(mini_root, "val")
    for fold in range(4):
        trick, no_trick = build_fold_list(train, fold, "train", True), build_fold_list(train, fold, "train", False)
        test = build_fold_list(val, fold, "val")
        assert min(trick.counts().values()) >= 6 and min(test.counts().values()) >= 6
        assert len(trick.ids) < len(no_trick.ids)  # the trick drops images holding novel classes
        novel = set(test.classes)
        assert all(novel.isdisjoint(train.counts[train.index[k]]) for k in trick.ids)
        # some non-main objects are present but below 2048 pixels: the rule is exercised
        small = [k for k in test.ids if set(test.query_classes[k]) - {c for c in novel if k in test.class_images[c]}]
        assert small


def test_generation_is_deterministic(tmp_path):
    try:
        load_fashion()
    except Exception as e:
        pytest.skip(str(e))
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        make_mini(tmp_path / name, seed=seed, train_images=4, val_images=3)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 4 + 4 + 3 + 3 + 2 + 2
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    labels = [Path("SegmentationClassAug") / f"train_{i:05d}.png" for i in range(4)]
    assert any((tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes() for f in labels)


@pytest.mark.parametrize(("shots", "size", "episodes"), [(1, 473, 12), (5, 201, 12)])
def test_pascal_code_path_end_to_end(mini_root, shots, size, episodes):
    ds = PascalDataset(root=mini_root, fold=3, split="val", shots=shots, episodes=episodes, size=size)
    loader = DataLoader(ds, batch_size=4, collate_fn=collate_episodes)
    oracle, empty, resized = FSSMeter(ds.novel), FSSMeter(ds.novel), FSSMeter(ds.novel)
    bg = valid = 0
    for batch in loader:
        assert batch["support"].shape[1:] == (shots, 3, size, size) and batch["query"].shape[1:] == (3, size, size)
        for i, label in enumerate(batch["query_label"]):
            cls = int(batch["class_id"][i])
            assert cls in ds.fold_list.query_classes[ds.table[int(batch["index"][i])].query]
            oracle.update(label == 1, label, cls)
            empty.update(torch.zeros_like(label), label, cls)
            bg, valid = bg + int((label == 0).sum()), valid + int((label != 255).sum())
            # the canvas mask as one-hot logits, mapped back to the original size: the resize protocol round trip
            canvas = batch["query_mask"][i]
            logits = torch.stack([(canvas == 0).float(), (canvas == 1).float()])
            pred = to_original_size(logits, tuple(batch["orig_size"][i].tolist())).argmax(0)
            resized.update(pred, label, cls)
    seen = [c for c, n in oracle.summary()["episodes"].items() if n]
    assert all(oracle.class_iou()[c] == 1.0 for c in seen) and empty.miou() == 0.0
    assert oracle.miou() == pytest.approx(len(seen) / 5)  # a class without episodes counts 0
    assert empty.fb_iou() == pytest.approx(0.5 * bg / valid)  # background IoU only; foreground IoU is 0
    assert all(resized.class_iou()[c] > 0.9 for c in seen)
    assert sum(oracle.summary()["episodes"].values()) == episodes


def test_train_items_carry_base_labels(mini_root):
    ds = MiniDataset(root=mini_root, fold=0, split="train", shots=1, base_labels=True)
    item = ds[0]
    assert ds.table.order == "shuffle" and len(ds) == len(ds.fold_list.ids)
    assert item["query"].shape == (3, 473, 473) and item["support_mask"].shape == (1, 473, 473)
    assert item["class_id"] in ds.base
    base_values = set(item["query_base"].unique().tolist())
    assert base_values <= set(range(16)) | {255}
    fg = item["query_mask"] == 1
    assert fg.any() and (item["query_base"][fg] == ds.base.index(item["class_id"]) + 1).all()
