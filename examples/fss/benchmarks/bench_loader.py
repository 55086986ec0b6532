"""Data-loader speed for the FSS training chain at 473 px: images per second per worker.

Builds a VOC-sized copy of the mini benchmark (every image and label resized to 500x375 or 375x500, written as
JPEG + PNG in the Pascal layout), then measures in one process with one intra-op thread (what a DataLoader
worker gets):
  transform  TrainTransform(473) alone on decoded arrays (image + episode mask)
  decode     JPEG + PNG decoding alone
  item       PascalDataset(split="train")[i]: decode + binarise + chain for the query and K supports
  test item  PascalDataset(split="val")[i]: decode + TestResize(473)
and, with --workers N, a DataLoader(num_workers=N, batch_size=8) end to end.

    .venv/bin/python examples/fss/benchmarks/bench_loader.py [--shots 1] [--items 60] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from svf_fss.data import PascalDataset, TrainTransform, binary_mask, collate_episodes, read_list, write_list
from svf_fss.data.io import read_image, read_label
from svf_fss.data.mini import make_mini
from torch.utils.data import DataLoader


def voc_sized_copy(mini: Path, out: Path, n_train: int, n_val: int) -> Path:
    """Resize mini images/labels to VOC's typical 500x375 (landscape) / 375x500 (portrait)."""
    for sub in ("JPEGImages", "SegmentationClassAug"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val)):
        pairs = read_list(mini / "lists" / f"{split}.txt")[:n]
        for image, label in pairs:
            im, lab = Image.open(mini / image), Image.open(mini / label)
            size = (500, 375) if im.width >= im.height else (375, 500)
            im.resize(size, Image.Resampling.BILINEAR).save(out / image, quality=90)
            lab.resize(size, Image.Resampling.NEAREST).save(out / label)
        write_list(pairs, out / "lists" / f"{split}.txt")
    return out


def rate(fn, n: int, images_per_call: int) -> float:
    fn(0)  # warm-up
    t = time.perf_counter()
    for i in range(n):
        fn(i)
    return n * images_per_call / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shots", type=int, default=1)
    ap.add_argument("--items", type=int, default=60, help="items per measurement")
    ap.add_argument("--workers", type=int, default=0, help="also time a DataLoader with this many workers")
    ap.add_argument("--json", help="write the numbers here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_mini(tmp / "mini", seed=0, train_images=320, val_images=160)
        root = voc_sized_copy(tmp / "mini", tmp / "voc", 320, 160)
        train = PascalDataset(root, fold=0, split="train", shots=args.shots, cache_dir=False)
        val = PascalDataset(root, fold=0, split="val", shots=args.shots, episodes=args.items + 1, cache_dir=False)
        n = min(args.items, len(train))
        chain = TrainTransform(473)
        keys = train.fold_list.ids
        decoded = [(read_image(train.stats.image_path(k)), read_label(train.stats.label_path(k), 20)) for k in keys[:n]]
        masks = [(img, binary_mask(lab, int(lab[lab < 255].max()))) for img, lab in decoded]

        def transform_only(i):
            img, m = masks[i % len(masks)]
            chain(img, [m], np.random.default_rng(i))

        def decode_only(i):
            k = keys[i % len(keys)]
            read_image(train.stats.image_path(k))
            read_label(train.stats.label_path(k), 20)

        per_item = args.shots + 1
        result = {
            "shots": args.shots,
            "image_size": "500x375 / 375x500",
            "crop": 473,
            "transform_img_per_s": rate(transform_only, n, 1),
            "decode_img_per_s": rate(decode_only, n, 1),
            "train_item_img_per_s": rate(lambda i: train[i], n, per_item),
            "test_item_img_per_s": rate(lambda i: val[i], n, per_item),
        }
        if args.workers:
            loader = DataLoader(train, batch_size=8, num_workers=args.workers, collate_fn=collate_episodes)
            t = time.perf_counter()
            count = sum(b["query"].shape[0] for b in loader)
            result[f"dataloader_{args.workers}w_img_per_s"] = count * per_item / (time.perf_counter() - t)
    result["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    result["load_avg"] = os.getloadavg()[0]
    result["torch"] = torch.__version__
    for k, v in result.items():
        print(f"{k:28s} {v:.1f}" if isinstance(v, float) else f"{k:28s} {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
