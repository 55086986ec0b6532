"""Data subcommands of the ``svf-fss`` CLI: make-mini, voc-lists, coco-labels, build-lists, episodes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .folds import BAM_TEST_SEEDS, MIN_PIXELS, PAPER_TEST_EPISODES, PAPER_TEST_SEED, SPECS, fold_classes


def _make_mini(args: argparse.Namespace) -> int:
    from .mini import make_mini

    counts = make_mini(args.out, args.seed, args.train, args.val, args.fashion_dir)
    print(f"wrote the mini benchmark to {args.out}: {counts['train']} train / {counts['val']} val images")
    return 0


def _voc_lists(args: argparse.Namespace) -> int:
    from .lists import voc_lists, write_list

    train, val = voc_lists(args.root, args.sbd_train_noval)
    out = Path(args.out or Path(args.root) / "lists")
    write_list(train, out / "train.txt")
    write_list(val, out / "val.txt")
    print(f"wrote {out / 'train.txt'} ({len(train)} lines) and {out / 'val.txt'} ({len(val)} lines)")
    return 0


def _coco_labels(args: argparse.Namespace) -> int:
    from .coco_labels import coco_labels

    written = coco_labels(
        args.root, args.splits, args.annotations, args.crowd, args.workers, args.backend, args.skip_existing
    )
    for split, path in written.items():
        n = len(path.read_text().splitlines())
        print(f"{split}: {n} label PNGs under {Path(args.root) / 'annotations' / split}, list {path}")
    return 0


def _build_lists(args: argparse.Namespace) -> int:
    from .lists import build_fold_list, load_stats, write_fold_list

    folds = args.fold if args.fold is not None else list(range(SPECS[args.dataset].num_folds))
    cache = False if args.no_cache else args.cache_dir
    report: dict = {}
    for split in ("train", "val"):
        list_file = args.train_list if split == "train" else args.val_list
        stats = load_stats(args.root, split, args.dataset, list_file, cache, args.workers, args.list_prefix)
        for trick in (True, False) if split == "train" else (True,):
            for fold in folds:
                fl = build_fold_list(stats, fold, split, trick, args.min_pixels, args.fold_split)
                name = f"{split}{'' if trick or split == 'val' else '_notrick'}"
                report.setdefault(name, {})[fold] = len(fl.ids)
                if args.out:
                    write_fold_list(fl, stats, args.out)
    for name, per_fold in report.items():
        print(f"{name:14s} " + " ".join(f"fold{f}={n}" for f, n in per_fold.items()))
    if args.out:
        (Path(args.out) / "counts.json").write_text(json.dumps(report, indent=1))
        print(f"wrote per-fold lists to {args.out}")
    return 0


def _episodes(args: argparse.Namespace) -> int:
    from .episodes import make_episodes
    from .lists import build_fold_list, load_stats

    cache = False if args.no_cache else None
    stats = load_stats(args.root, args.split, args.dataset, args.list, cache, list_prefix=args.list_prefix)
    fl = build_fold_list(stats, args.fold, args.split, not args.no_trick, fold_split=args.fold_split)
    seeds = BAM_TEST_SEEDS if args.bam_seeds else [args.seed]
    for seed in seeds:
        table = make_episodes(fl, args.num, args.shots, seed, "cycle" if args.split == "val" else "shuffle")
        out = Path(args.out.format(seed=seed, fold=args.fold, shots=args.shots))
        table.save(out)
        print(f"{out}: {len(table)} {args.shots}-shot episodes, {args.dataset} fold {args.fold}, seed {seed}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the data subcommands to the top-level parser's subparsers."""
    p = sub.add_parser("make-mini", help="generate the offline mini benchmark (Pascal layout, 20 classes)")
    p.add_argument("out", help="output folder")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    p.add_argument("--train", type=int, default=320, help="train images (default 320)")
    p.add_argument("--val", type=int, default=160, help="val images (default 160)")
    p.add_argument("--fashion-dir", help="folder with Fashion-MNIST t10k-*.gz (default: Debian's location)")
    p.set_defaults(func=_make_mini)

    p = sub.add_parser("voc-lists", help="write Pascal lists/train.txt and lists/val.txt from VOC + SBD ids")
    p.add_argument("--root", required=True, help="VOC2012 folder (JPEGImages/, ImageSets/Segmentation/)")
    p.add_argument("--sbd-train-noval", help="SBD train_noval id file (5,623 ids) merged into train")
    p.add_argument("--out", help="output folder (default ROOT/lists)")
    p.set_defaults(func=_voc_lists)

    p = sub.add_parser("coco-labels", help="write COCO label PNGs and lists from the official instance JSON")
    p.add_argument("--root", required=True, help="COCO folder (train2014/, val2014/, annotations/)")
    p.add_argument(
        "--splits", nargs="+", default=["train2014", "val2014"], help="image folders to label (default both)"
    )
    p.add_argument("--annotations", help="folder of instances_<split>.json (default ROOT/annotations)")
    p.add_argument("--crowd", choices=["class", "void", "skip"], default="class", help="crowd regions (default class)")
    p.add_argument(
        "--backend",
        choices=["builtin", "pycocotools"],
        default="builtin",
        help="mask decoder: builtin (no dependency) or pycocotools (extra svf-fss[coco]); default builtin",
    )
    p.add_argument("--workers", type=int, default=0, help="processes (0 = in-process)")
    p.add_argument("--skip-existing", action="store_true", help="keep PNGs already written (resume)")
    p.set_defaults(func=_coco_labels)

    p = sub.add_parser("build-lists", help="scan labels, cache class statistics and print/write per-fold lists")
    _dataset_args(p)
    p.add_argument("--train-list", help="train list (default ROOT/lists/train.txt)")
    p.add_argument("--val-list", help="val list (default ROOT/lists/val.txt)")
    p.add_argument("--fold", type=int, nargs="+", help="folds (default all)")
    p.add_argument(
        "--min-pixels", type=int, default=MIN_PIXELS, help=f"pixels for a class to qualify (default {MIN_PIXELS})"
    )
    p.add_argument("--out", help="write {split}_fold{f}[_notrick].txt, class maps and counts.json here")
    p.add_argument("--workers", type=int, default=0, help="processes for the label scan")
    p.add_argument("--cache-dir", help="label-statistics cache (default ROOT/svf_fss_cache)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the label-statistics cache")
    p.set_defaults(func=_build_lists)

    p = sub.add_parser("episodes", help="pre-generate a seeded episode table (JSON)")
    _dataset_args(p)
    p.add_argument("--fold", type=int, required=True, help="fold 0-3")
    p.add_argument("--split", choices=["train", "val"], default="val", help="list split (default val)")
    p.add_argument("--list", help="list file (default ROOT/lists/<split>.txt)")
    p.add_argument("--shots", type=int, default=1, help="support images per episode (default 1)")
    p.add_argument("--num", type=int, default=PAPER_TEST_EPISODES, help="episodes (default 1000)")
    p.add_argument("--seed", type=int, default=PAPER_TEST_SEED, help="seed (default 321, the paper's)")
    p.add_argument("--bam-seeds", action="store_true", help=f"one table per BAM seed {BAM_TEST_SEEDS}")
    p.add_argument("--no-trick", action="store_true", help="train split without the dataset trick")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the label-statistics cache")
    p.add_argument("--out", required=True, help="output path; may use {seed}, {fold}, {shots}")
    p.set_defaults(func=_episodes)


def _dataset_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", choices=sorted(SPECS), default="pascal", help="dataset (default pascal)")
    p.add_argument("--root", required=True, help="data root")
    p.add_argument(
        "--fold-split", choices=["consecutive", "interleaved"], help="class split (default: the dataset's own)"
    )
    p.add_argument(
        "--list-prefix",
        metavar="PREFIX|auto",
        help="read list files with absolute paths (e.g. the SVF release's /root/paddlejob/.../data_list_0.txt): "
        "strip PREFIX from every path, or 'auto' to keep each path from its JPEGImages/, SegmentationClassAug/ "
        "(COCO: train2014/, val2014/, annotations/) folder on",
    )


__all__ = ["fold_classes", "register"]
