"""Episode tables: seeded, invariant-respecting, JSON round-trip, independent of DataLoader workers."""

import numpy as np
import pytest
import torch
from svf_fss.data import (
    BAM_TEST_SEEDS,
    DataError,
    EpisodeTable,
    FoldList,
    PascalDataset,
    collate_episodes,
    make_episodes,
)
from torch.utils.data import DataLoader

pytestmark = pytest.mark.usefixtures("single_thread")


def fold_list(n_images: int = 30, classes=(1, 2, 3), seed: int = 0) -> FoldList:
    """A synthetic fold list: every image holds 1-3 classes, most of them qualifying."""
    rng = np.random.default_rng(seed)
    ids = [f"im{i:03d}" for i in range(n_images)]
    present, per_class = {}, {c: [] for c in classes}
    for i, key in enumerate(ids):
        cs = sorted({classes[i % len(classes)], *rng.choice(classes, size=int(rng.integers(0, 3)))})
        present[key] = [int(c) for c in cs]
        for c in cs:
            if c == classes[i % len(classes)] or rng.random() < 0.5:  # the rest are too small to be supports
                per_class[int(c)].append(key)
    return FoldList("pascal", 0, "val", False, list(classes), ids, present, per_class, key="k" * 40)


@pytest.mark.parametrize("shots", [1, 5])
def test_episode_invariants(shots):
    fl = fold_list()
    table = make_episodes(fl, num=1000, shots=shots, seed=321)
    assert len(table) == 1000 and table.shots == shots and table.seed == 321
    for i, ep in enumerate(table.episodes):
        assert ep.query == fl.ids[i % len(fl.ids)]  # the test loop walks the list in order, wrapping around
        assert ep.cls in fl.query_classes[ep.query]
        assert len(ep.supports) == shots == len(set(ep.supports))
        assert ep.query not in ep.supports
        assert all(s in fl.class_images[ep.cls] for s in ep.supports)


def test_same_seed_same_table_other_seeds_differ():
    fl = fold_list()
    a, b = make_episodes(fl, 200, 5, 321), make_episodes(fl, 200, 5, 321)
    assert a.episodes == b.episodes
    tables = [make_episodes(fl, 200, 5, s).episodes for s in BAM_TEST_SEEDS]
    assert BAM_TEST_SEEDS == (510, 365, 382, 322, 988)
    assert all(t != a.episodes for t in tables) and len({tuple(t) for t in tables}) == 5


def test_class_is_uniform_among_present_classes_and_supports_cover_the_pool():
    ids = ["q", "s1", "s2", "s3", "s4"]
    present = {"q": [1, 2], **{s: [1, 2] for s in ids[1:]}}
    fl = FoldList("pascal", 0, "val", False, [1, 2], ids, present, {1: ids, 2: ids[1:]}, key="x")
    table = make_episodes(fl, 4000, 1, 7)
    q_eps = [e for e in table.episodes if e.query == "q"]
    share = np.mean([e.cls == 1 for e in q_eps])
    assert abs(share - 0.5) < 0.08  # 800 draws: 0.5 +- 5 standard deviations
    used = {s for e in q_eps for s in e.supports}
    assert used == {"s1", "s2", "s3", "s4"}  # the query's own slot is skipped, every other image is drawn


def test_shuffle_order_is_a_permutation_per_pass_and_any_count_works():
    fl = fold_list()
    table = make_episodes(fl, num=len(fl.ids) * 2 + 7, shots=1, seed=1, order="shuffle")
    first, second = [e.query for e in table.episodes[:30]], [e.query for e in table.episodes[30:60]]
    assert sorted(first) == sorted(fl.ids) == sorted(second) and first != second
    assert len(table) == 67
    assert len(make_episodes(fl, shots=1)) == len(fl.ids)  # default: one per list image
    assert make_episodes(fl, 50, 1, 1, "shuffle", epoch=1).episodes != make_episodes(fl, 50, 1, 1, "shuffle").episodes


def test_json_round_trip(tmp_path):
    table = make_episodes(fold_list(), 100, 5, 321)
    path = table.save(tmp_path / "t.json")
    loaded = EpisodeTable.load(path)
    assert loaded == table
    path.write_text('{"format": "something else"}')
    with pytest.raises(DataError, match="malformed episode table"):
        EpisodeTable.load(path)
    with pytest.raises(DataError, match="not found"):
        EpisodeTable.load(tmp_path / "none.json")


def test_too_few_supports_is_a_clear_error():
    fl = FoldList("pascal", 2, "val", False, [11], ["a", "b"], {"a": [11], "b": [11]}, {11: ["a", "b"]}, key="x")
    make_episodes(fl, 10, shots=1)
    with pytest.raises(DataError, match=r"fold 2 val: classes \{11: 2\}.*too few for 5-shot"):
        make_episodes(fl, 10, shots=5)


def _batches(ds, workers):
    loader = DataLoader(ds, batch_size=2, num_workers=workers, collate_fn=collate_episodes)
    return list(loader)


def test_items_do_not_depend_on_the_worker_count(mini_root):
    ds = PascalDataset(mini_root, fold=2, split="train", shots=2, episodes=4, seed=5)
    ds.transform.size = 96  # smaller crops keep the test quick; the chain is unchanged
    ref, par = _batches(ds, 0), _batches(ds, 2)
    for a, b in zip(ref, par, strict=True):
        for k in ("query", "query_mask", "support", "support_mask", "class_id", "index"):
            assert torch.equal(a[k], b[k]), k
    ds.set_epoch(1)
    assert not torch.equal(_batches(ds, 0)[0]["query"], ref[0]["query"])


def test_dataset_checks_the_table_it_is_given(mini_root):
    ds = PascalDataset(mini_root, fold=0, split="val", shots=1, episodes=10)
    other = PascalDataset(mini_root, fold=1, split="val", shots=1, episodes=10)
    same = PascalDataset(mini_root, fold=0, split="val", table=ds.table)
    assert [same.table[i] for i in range(10)] == ds.table.episodes
    with pytest.raises(DataError, match="episode table was made for pascal fold 1 val"):
        PascalDataset(mini_root, fold=0, split="val", table=other.table)
    with pytest.raises(DataError, match="not pascal fold 0 train"):
        PascalDataset(mini_root, fold=0, split="train", table=ds.table)
    five = PascalDataset(mini_root, fold=0, split="val", shots=5, episodes=3)
    assert PascalDataset(mini_root, fold=0, split="val", table=five.table)[0]["support"].shape[0] == 5
