"""P x K batch sampler for triplet / contrastive training.

Each batch holds P distinct identities with K images each (an identity with fewer
than K images contributes all of them plus repeats). Identities with a single image
are dropped (they cannot provide a positive). Use it as
``DataLoader(dataset, batch_sampler=PKBatchSampler(labels, p, k, seed=...))``
and call ``set_epoch(e)`` before each epoch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


def _int_at_least(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"PKBatchSampler: {name} = {value!r} is not allowed; expected an integer >= {low}")
    return int(value)


class PKBatchSampler(Sampler[list[int]]):
    """Batches of P identities x K images, deterministic given ``seed`` and the epoch.

    ``labels[i]`` is the identity of dataset index ``i`` (any sortable values).

    Length: an epoch has ``batches_per_epoch`` batches in total across replicas
    (default max(1, usable images // (P*K))), rounded up to a multiple of
    ``num_replicas``; rank r gets global batches r, r + num_replicas, ..., so ranks get
    disjoint batches and the same number, ``len(sampler)``, each.

    Order: identities are visited in a stream of shuffled permutations (each identity
    once per permutation, P distinct identities per batch). Each epoch shuffles the
    images of every identity; its t-th visit takes the next K images of that order
    (wrapping around), so an identity with >= K images gives K distinct ones, one with
    fewer gives all of its images plus repeats, and images are used evenly.
    Within a batch the K images of an identity are consecutive.
    """

    def __init__(
        self,
        labels: Sequence[int],
        p: int,
        k: int,
        *,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
        batches_per_epoch: int | None = None,
    ) -> None:
        self.p = _int_at_least("p", p, 2)
        self.k = _int_at_least("k", k, 2)
        self.seed = _int_at_least("seed", seed, 0)
        self.num_replicas = _int_at_least("num_replicas", num_replicas, 1)
        self.rank = _int_at_least("rank", rank, 0)
        if self.rank >= self.num_replicas:
            raise ValueError(f"PKBatchSampler: rank = {rank} is not allowed; expected 0 <= rank < {num_replicas}")
        array = np.asarray(labels)
        if array.ndim != 1 or array.size == 0:
            raise ValueError(f"PKBatchSampler: labels must be a non-empty 1-D sequence, got shape {array.shape}")
        _, inverse, counts = np.unique(array, return_inverse=True, return_counts=True)
        keep = counts >= 2
        self.dropped_identities = int((~keep).sum())
        if int(keep.sum()) < self.p:
            raise ValueError(
                f"PKBatchSampler: only {int(keep.sum())} identities have 2+ images "
                f"({self.dropped_identities} of {len(counts)} dropped for having a single image); "
                f"need at least p = {self.p}"
            )
        # usable dataset indices grouped by identity: identity j owns flat[offsets[j]:offsets[j]+sizes[j]]
        new_id = np.cumsum(keep) - 1
        usable = np.flatnonzero(keep[inverse])
        group = new_id[inverse[usable]]
        order = np.argsort(group, kind="stable")
        self.flat = usable[order]
        self.flat_group = group[order]
        self.sizes = counts[keep]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
        total = max(1, len(self.flat) // (self.p * self.k))
        if batches_per_epoch is not None:
            total = _int_at_least("batches_per_epoch", batches_per_epoch, 1)
        self.per_rank = math.ceil(total / self.num_replicas)
        self.epoch = 0

    @property
    def num_identities(self) -> int:
        """Identities kept (those with 2+ images)."""
        return len(self.sizes)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches the next iteration yields."""
        self.epoch = _int_at_least("epoch", epoch, 0)

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.global_batches()[self.rank :: self.num_replicas]

    def global_batches(self) -> list[list[int]]:
        """All batches of the current epoch, across every rank, in order."""
        rng = np.random.default_rng([self.seed, self.epoch])
        total = self.per_rank * self.num_replicas
        chosen = self._identity_stream(rng, total)  # [total, P]
        # per-epoch shuffle of the images inside each identity's block
        shuffled = self.flat[np.lexsort((rng.random(len(self.flat)), self.flat_group))]
        visit = _occurrence_number(chosen.ravel()).reshape(chosen.shape)
        steps = visit[..., None] * self.k + np.arange(self.k)  # [total, P, K]
        positions = self.offsets[chosen][..., None] + steps % self.sizes[chosen][..., None]
        return shuffled[positions].reshape(total, self.p * self.k).tolist()

    def _identity_stream(self, rng: np.random.Generator, total: int) -> np.ndarray:
        out = np.empty((total, self.p), dtype=np.int64)
        queue: list[int] = []
        pos = 0
        for b in range(total):
            if len(queue) - pos < self.p:
                queue, pos = self._extend(queue[pos:], rng.permutation(self.num_identities).tolist()), 0
            out[b] = queue[pos : pos + self.p]
            pos += self.p
        return out

    def _extend(self, leftover: list[int], perm: list[int]) -> list[int]:
        """Append a permutation to the ``leftover`` (< P) identities of the previous one.

        The new copies of the leftover identities are moved just past the batch they
        finish, so that batch still has P distinct identities. Every identity is thus
        visited once per permutation, and visit counts differ by at most one.
        """
        held = set(leftover)
        fresh = [i for i in perm if i not in held]
        again = [i for i in perm if i in held]
        cut = self.p - len(leftover)
        return leftover + fresh[:cut] + again + fresh[cut:]


def _occurrence_number(values: np.ndarray) -> np.ndarray:
    """For each element, how many equal elements come before it: [3, 5, 3, 3] -> [0, 0, 1, 2]."""
    order = np.argsort(values, kind="stable")
    ranked = values[order]
    starts = np.concatenate([[0], np.flatnonzero(np.diff(ranked)) + 1])
    run_start = np.repeat(starts, np.diff(np.concatenate([starts, [len(ranked)]])))
    out = np.empty_like(values)
    out[order] = np.arange(len(values)) - run_start
    return out
