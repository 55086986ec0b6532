"""Pascal-5i / COCO-20i data: folds, per-fold lists, episode tables, transforms, metrics and label tools."""

from .datasets import COCODataset, FSSDataset, MiniDataset, PascalDataset, base_label_map, binary_mask, collate_episodes
from .episodes import Episode, EpisodeTable, make_episodes
from .errors import DataError
from .folds import (
    BAM_TEST_SEEDS,
    COCO,
    COCO_CLASSES,
    IGNORE_INDEX,
    MIN_PIXELS,
    MINI,
    MINI_CLASSES,
    PAPER_TEST_EPISODES,
    PAPER_TEST_SEED,
    PASCAL,
    PASCAL_CLASSES,
    DatasetSpec,
    fold_classes,
    get_spec,
)
from .lists import FoldList, LabelStats, build_fold_list, load_stats, read_list, select_images, voc_lists, write_list
from .metrics import FSSMeter, episode_counts, mean_over_folds
from .transforms import IMAGENET_MEAN, IMAGENET_STD, TestResize, TrainTransform, to_original_size

__all__ = [
    "BAM_TEST_SEEDS",
    "COCO",
    "COCO_CLASSES",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MINI",
    "MINI_CLASSES",
    "MIN_PIXELS",
    "PAPER_TEST_EPISODES",
    "PAPER_TEST_SEED",
    "PASCAL",
    "PASCAL_CLASSES",
    "COCODataset",
    "DataError",
    "DatasetSpec",
    "Episode",
    "EpisodeTable",
    "FSSDataset",
    "FSSMeter",
    "FoldList",
    "LabelStats",
    "MiniDataset",
    "PascalDataset",
    "TestResize",
    "TrainTransform",
    "base_label_map",
    "binary_mask",
    "build_fold_list",
    "collate_episodes",
    "episode_counts",
    "fold_classes",
    "get_spec",
    "load_stats",
    "make_episodes",
    "mean_over_folds",
    "read_list",
    "select_images",
    "to_original_size",
    "voc_lists",
    "write_list",
]
