"""PKBatchSampler: batch structure, singletons, determinism, replicas, errors."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from pipeline.samplers import PKBatchSampler

# identity -> number of images: 5 with plenty, 2 with fewer than K=4, 2 singletons
COUNTS = {0: 9, 1: 6, 2: 5, 3: 4, 4: 12, 5: 2, 6: 3, 7: 1, 8: 1}
LABELS = [ident for ident, n in COUNTS.items() for _ in range(n)]


def make(**kw) -> PKBatchSampler:
    args = {"p": 3, "k": 4, "seed": 0} | kw
    return PKBatchSampler(LABELS, args.pop("p"), args.pop("k"), **args)


def test_every_batch_is_p_identities_times_k_images() -> None:
    sampler = make(batches_per_epoch=50)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 50
    for b in batches:
        assert len(b) == 12
        per_id = Counter(LABELS[i] for i in b)
        assert len(per_id) == 3 and set(per_id.values()) == {4}
        assert all(0 <= i < len(LABELS) for i in b)
        for ident in per_id:  # images of an identity are distinct when it has >= K
            mine = [i for i in b if LABELS[i] == ident]
            if COUNTS[ident] >= 4:
                assert len(set(mine)) == 4


def test_small_identities_are_sampled_with_replacement_and_singletons_dropped() -> None:
    sampler = make(batches_per_epoch=200)
    seen = Counter()
    for b in sampler:
        for ident in {LABELS[i] for i in b}:
            mine = [i for i in b if LABELS[i] == ident]
            if COUNTS[ident] < 4:
                # all of its images, the rest repeats
                assert set(mine) == {i for i, lab in enumerate(LABELS) if lab == ident}
            seen[ident] += 1
    assert set(seen) == {0, 1, 2, 3, 4, 5, 6}  # 7 and 8 have a single image
    assert sampler.dropped_identities == 2 and sampler.num_identities == 7
    # identities are visited evenly (a stream of permutations), not at random
    assert max(seen.values()) - min(seen.values()) <= 1
    # and so are the images of each identity within the epoch
    used = Counter(i for b in sampler for i in b)
    for ident, n in COUNTS.items():
        if n > 1:
            uses = [used[i] for i, lab in enumerate(LABELS) if lab == ident]
            assert max(uses) - min(uses) <= 1, ident


def test_default_length_uses_the_usable_images() -> None:
    usable = len(LABELS) - 2  # the two singletons
    assert len(make()) == usable // 12
    assert len(make(p=2, k=2)) == usable // 4


def test_deterministic_given_seed_and_epoch() -> None:
    a, b = make(seed=5), make(seed=5)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(make(seed=6)) != list(make(seed=5))
    assert list(a) == list(a)  # re-iterating an epoch repeats it


def test_replicas_get_disjoint_shares_of_the_same_batches() -> None:
    single = make(batches_per_epoch=10)
    r0 = make(batches_per_epoch=10, num_replicas=2, rank=0)
    r1 = make(batches_per_epoch=10, num_replicas=2, rank=1)
    for s in (single, r0, r1):
        s.set_epoch(3)
    all_batches, b0, b1 = list(single), list(r0), list(r1)
    assert len(r0) == len(r1) == len(b0) == len(b1) == 5
    assert b0 == all_batches[0::2] and b1 == all_batches[1::2]
    # an odd total is rounded up so every rank has the same number of steps
    odd = [make(batches_per_epoch=7, num_replicas=3, rank=r) for r in range(3)]
    assert [len(s) for s in odd] == [3, 3, 3]
    assert [len(list(s)) for s in odd] == [3, 3, 3]


def test_works_as_dataloader_batch_sampler() -> None:
    labels = torch.tensor(LABELS)
    data = TensorDataset(torch.arange(len(LABELS)), labels)
    loader = DataLoader(data, batch_sampler=make(batches_per_epoch=4))
    got = list(loader)
    assert len(got) == 4
    index, lab = got[0]
    assert index.shape == (12,) and torch.equal(lab, labels[index])


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"p": 1}, "p = 1"),
        ({"k": 1}, "k = 1"),
        ({"p": 8}, "only 7 identities"),
        ({"num_replicas": 2, "rank": 2}, "rank = 2"),
        ({"num_replicas": 0}, "num_replicas"),
        ({"batches_per_epoch": 0}, "batches_per_epoch"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments_raise_value_error(kw: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        make(**kw)


def test_too_few_identities_after_dropping_singletons() -> None:
    with pytest.raises(ValueError, match=r"only 1 identities have 2\+ images \(2 of 3 dropped"):
        PKBatchSampler([0, 0, 1, 2], p=2, k=2, seed=0)
    with pytest.raises(ValueError, match="set_epoch|epoch"):
        make().set_epoch(-1)
