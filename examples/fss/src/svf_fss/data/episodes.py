"""Pre-generated episode tables: (query, class, support ids) drawn from a seeded numpy Generator.

The table is made before any DataLoader exists, so the episodes do not depend on the worker count (the public
code draws them inside workers). Tables are plain data and round-trip through JSON.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import data_error
from .folds import BAM_TEST_SEEDS, PAPER_TEST_EPISODES, PAPER_TEST_SEED
from .lists import FoldList

TABLE_FORMAT = "svf-fss-episodes/1"
__all__ = ["BAM_TEST_SEEDS", "PAPER_TEST_EPISODES", "PAPER_TEST_SEED", "Episode", "EpisodeTable", "make_episodes"]


@dataclass(frozen=True)
class Episode:
    """One few-shot task: a query image, its class and the support images (ids are file stems)."""

    query: str  # image id (file stem)
    cls: int  # dataset class id (1-based)
    supports: tuple[str, ...]


@dataclass
class EpisodeTable:
    """Episodes plus what produced them; ``key`` is the content hash of the list they were drawn from."""

    dataset: str
    fold: int
    split: str
    shots: int
    seed: int
    epoch: int
    order: str
    trick: bool
    key: str
    episodes: list[Episode] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.episodes)

    def __getitem__(self, i: int) -> Episode:
        return self.episodes[i]

    def to_json(self) -> dict:
        d = asdict(self)
        d["episodes"] = [[e.query, e.cls, list(e.supports)] for e in self.episodes]
        return {"format": TABLE_FORMAT, **d}

    @classmethod
    def from_json(cls, d: dict) -> EpisodeTable:
        if d.get("format") != TABLE_FORMAT:
            raise ValueError(f"not an episode table (format {d.get('format')!r}, expected {TABLE_FORMAT!r})")
        fields = {k: v for k, v in d.items() if k not in ("format", "episodes")}
        eps = [Episode(str(q), int(c), tuple(str(s) for s in sup)) for q, c, sup in d["episodes"]]
        return cls(**fields, episodes=eps)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json()))
        return path

    @classmethod
    def load(cls, path: str | Path) -> EpisodeTable:
        path = Path(path)
        if not path.is_file():
            raise data_error("episode table not found", path)
        try:
            return cls.from_json(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError) as e:
            raise data_error(f"malformed episode table ({e})", path) from None


def check_supports(fold_list: FoldList, shots: int) -> None:
    """Raise DataError if a class that can be drawn for a query has fewer than shots + 1 qualifying images."""
    drawable = {c for cs in fold_list.query_classes.values() for c in cs}
    short = {c: len(fold_list.class_images[c]) for c in sorted(drawable) if len(fold_list.class_images[c]) < shots + 1}
    if short:
        raise data_error(
            f"{fold_list.dataset} fold {fold_list.fold} {fold_list.split}: classes {short} (class: images) have "
            f"fewer than {shots + 1} images with >= {fold_list.min_pixels} pixels, too few for {shots}-shot episodes"
        )


def make_episodes(
    fold_list: FoldList,
    num: int | None = None,
    shots: int = 1,
    seed: int = PAPER_TEST_SEED,
    order: str = "cycle",
    epoch: int = 0,
) -> EpisodeTable:
    """Draw ``num`` episodes (default: one per list image).

    Queries: ``order="cycle"`` walks the list in order and wraps around (the public test loop);
    ``order="shuffle"`` concatenates seeded permutations of the list (a training epoch).
    Class: uniform among the fold classes present in the query (any size). Supports: ``shots`` distinct images
    where that class covers >= min_pixels, never the query, in draw order. The generator is
    ``numpy.random.default_rng([seed, epoch])``.
    """
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    if order not in ("cycle", "shuffle"):
        raise ValueError(f"order must be 'cycle' or 'shuffle', got {order!r}")
    ids = fold_list.ids
    if not ids:
        raise data_error(f"{fold_list.dataset} fold {fold_list.fold} {fold_list.split}: the fold list is empty")
    check_supports(fold_list, shots)
    num = len(ids) if num is None else int(num)
    rng = np.random.default_rng([seed, epoch])
    if order == "cycle":
        queries: Sequence[str] = [ids[i % len(ids)] for i in range(num)]
    else:
        perm = np.concatenate([rng.permutation(len(ids)) for _ in range(-(-num // len(ids)))])[:num]
        queries = [ids[i] for i in perm]
    position = {c: {k: i for i, k in enumerate(v)} for c, v in fold_list.class_images.items()}
    episodes = []
    for q in queries:
        classes = fold_list.query_classes[q]
        c = classes[int(rng.integers(len(classes)))]
        pool = fold_list.class_images[c]
        skip = position[c].get(q)  # the query's own slot in the pool, if it has one
        n = len(pool) - (skip is not None)
        picks = rng.choice(n, size=shots, replace=False)
        if skip is not None:
            picks = picks + (picks >= skip)
        episodes.append(Episode(q, int(c), tuple(pool[int(i)] for i in picks)))
    return EpisodeTable(
        fold_list.dataset,
        fold_list.fold,
        fold_list.split,
        shots,
        int(seed),
        int(epoch),
        order,
        fold_list.trick,
        fold_list.key,
        episodes,
    )
