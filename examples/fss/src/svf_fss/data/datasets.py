"""Episode datasets for Pascal-5i, COCO-20i and the offline mini benchmark (same code path for all three)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from .episodes import PAPER_TEST_EPISODES, PAPER_TEST_SEED, EpisodeTable, make_episodes
from .errors import data_error
from .folds import IGNORE_INDEX, MIN_PIXELS, fold_classes, get_spec
from .io import read_image, read_label
from .lists import FoldList, LabelStats, build_fold_list, load_stats
from .transforms import TestResize, TrainTransform

Transform = Callable[[np.ndarray, Sequence[np.ndarray], np.random.Generator], tuple[torch.Tensor, list[torch.Tensor]]]


def binary_mask(label: np.ndarray, cls: int) -> np.ndarray:
    """Episode mask: ``cls`` -> 1, void stays 255, every other value (other classes, background) -> 0."""
    out = (label == cls).astype(np.uint8)
    out[label == IGNORE_INDEX] = IGNORE_INDEX
    return out


def base_label_map(label: np.ndarray, base: Sequence[int]) -> np.ndarray:
    """BAM's base-learner target: base class base[i] -> i + 1, void stays 255, everything else -> 0."""
    lut = np.zeros(256, dtype=np.uint8)
    lut[np.asarray(base, dtype=np.int64)] = np.arange(1, len(base) + 1, dtype=np.uint8)
    lut[IGNORE_INDEX] = IGNORE_INDEX
    return lut[label]


class FSSDataset(Dataset):
    """Few-shot episodes read from a pre-generated :class:`EpisodeTable`.

    ``split="train"``: base classes, dataset trick on by default, one shuffled episode per list image and epoch
    (call :meth:`set_epoch` before each epoch; with ``persistent_workers=True`` the workers keep their own copy,
    so rebuild the loader instead), :class:`TrainTransform`. ``split="val"``: novel classes,
    ``episodes`` (default 1,000) drawn with ``seed`` (default 321), :class:`TestResize`, plus the query's binary
    label at original resolution for the metrics. Augmentation randomness comes from
    ``default_rng([seed, epoch, index])``, so an item is the same whatever the worker count.

    Items are dicts: ``query`` (3, S, S) float, ``query_mask`` (S, S) int64 in {0, 1, 255}, ``support``
    (K, 3, S, S), ``support_mask`` (K, S, S), ``class_id``, ``index``; with ``base_labels=True`` also
    ``query_base`` (S, S) (BAM's base classes 1..n, 0 background, 255 void); for ``split="val"`` also
    ``query_label`` (H, W) at original resolution and ``orig_size`` (use :func:`collate_episodes`).

    ``list_file`` / ``list_prefix``: another list than ``ROOT/lists/{split}.txt``, e.g. a per-fold
    ``data_list_F.txt`` of the SVF release with ``list_prefix="auto"`` to drop its absolute ``/root/...`` prefix
    (see :func:`svf_fss.data.lists.read_list`).
    """

    dataset_name = "pascal"

    def __init__(
        self,
        root: str | Path,
        fold: int,
        split: str = "val",
        shots: int = 1,
        episodes: int | None = None,
        seed: int = PAPER_TEST_SEED,
        trick: bool = True,
        *,
        dataset: str | None = None,
        list_file: str | Path | None = None,
        cache_dir: str | Path | bool | None = None,
        fold_split: str | None = None,
        min_pixels: int = MIN_PIXELS,
        transform: Transform | None = None,
        size: int | None = None,
        base_labels: bool = False,
        table: EpisodeTable | str | Path | None = None,
        scan_workers: int = 0,
        list_prefix: str | None = None,
    ) -> None:
        self.spec = get_spec(dataset or self.dataset_name)
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.split, self.fold, self.shots, self.seed = split, fold, shots, seed
        self.num_episodes = episodes
        self.base, self.novel = fold_classes(self.spec, fold, fold_split)
        self.stats: LabelStats = load_stats(root, split, self.spec, list_file, cache_dir, scan_workers, list_prefix)
        self.fold_list: FoldList = build_fold_list(self.stats, fold, split, trick, min_pixels, fold_split)
        self.base_labels = base_labels
        if transform is None:
            if split == "train":
                transform = TrainTransform(size or self.spec.train_size, self.spec.scale)
            else:
                transform = TestResize(size or self.spec.test_size)
        self.transform = transform
        if table is not None:
            self.table = table if isinstance(table, EpisodeTable) else EpisodeTable.load(table)
            self._check_table(self.table)
            self.shots = self.table.shots
        else:
            self.table = self.make_table(epoch=0)

    def make_table(self, epoch: int = 0) -> EpisodeTable:
        """Episodes for ``epoch``: the test protocol (list order, cycled) for val, a shuffled pass for train."""
        if self.split == "val":
            num = PAPER_TEST_EPISODES if self.num_episodes is None else self.num_episodes
            return make_episodes(self.fold_list, num, self.shots, self.seed, "cycle", epoch)
        return make_episodes(self.fold_list, self.num_episodes, self.shots, self.seed, "shuffle", epoch)

    def set_epoch(self, epoch: int) -> None:
        """Redraw the episodes for a new training epoch (deterministic in seed and epoch)."""
        self.table = self.make_table(epoch)

    def _check_table(self, table: EpisodeTable) -> None:
        mine = (self.spec.name, self.fold, self.split, self.stats.key)
        if (table.dataset, table.fold, table.split, table.key) != mine:
            raise data_error(
                f"episode table was made for {table.dataset} fold {table.fold} {table.split} from list "
                f"{table.key[:12]}, not {self.spec.name} fold {self.fold} {self.split} list {self.stats.key[:12]}"
            )

    def __len__(self) -> int:
        return len(self.table)

    def _load(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        image_path, label_path = self.stats.image_path(key), self.stats.label_path(key)
        image = read_image(image_path, self.spec.name)
        label = read_label(label_path, self.spec.num_classes, self.spec.name)
        if image.shape[:2] != label.shape:
            raise data_error(
                f"image {image_path} is {image.shape[1]}x{image.shape[0]} but its label is "
                f"{label.shape[1]}x{label.shape[0]}",
                label_path,
                self.spec.name,
            )
        return image, label

    def __getitem__(self, index: int) -> dict:
        ep = self.table[index]
        rng = np.random.default_rng([self.table.seed, self.table.epoch, index])
        image, label = self._load(ep.query)
        qmask = binary_mask(label, ep.cls)
        maps = [qmask, base_label_map(label, self.base)] if self.base_labels else [qmask]
        query, qmaps = self.transform(image, maps, rng)
        supports, smasks = [], []
        for key in ep.supports:
            s_image, s_label = self._load(key)
            s_img, s_maps = self.transform(s_image, [binary_mask(s_label, ep.cls)], rng)
            supports.append(s_img)
            smasks.append(s_maps[0])
        item = {
            "query": query,
            "query_mask": qmaps[0],
            "support": torch.stack(supports),
            "support_mask": torch.stack(smasks),
            "class_id": ep.cls,
            "index": index,
        }
        if self.base_labels:
            item["query_base"] = qmaps[1]
        if self.split == "val":
            item["query_label"] = torch.from_numpy(qmask).long()
            item["orig_size"] = torch.tensor(qmask.shape)
        return item


class PascalDataset(FSSDataset):
    """Pascal-5i: ``root`` holds JPEGImages/, SegmentationClassAug/ and lists/{train,val}.txt."""

    dataset_name = "pascal"


class COCODataset(FSSDataset):
    """COCO-20i: ``root`` holds train2014/, val2014/, annotations/{train,val}2014/*.png and lists/{train,val}.txt."""

    dataset_name = "coco"


class MiniDataset(FSSDataset):
    """The offline mini benchmark (Pascal layout; only the class names differ)."""

    dataset_name = "mini"


def collate_episodes(batch: list[dict]) -> dict:
    """Stack episode items; ``query_label`` (original sizes differ) stays a list."""
    labels = [item.pop("query_label") for item in batch] if "query_label" in batch[0] else None
    out = default_collate(batch)
    if labels is not None:
        out["query_label"] = labels
        for item, lab in zip(batch, labels, strict=True):
            item["query_label"] = lab
    return out
