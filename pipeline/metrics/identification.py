"""Closed-set rank-1 identification from embeddings (leave-one-out 1:N)."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

# Upper bound on the elements of one [chunk, N] similarity block in rank-1.
_RANK1_CHUNK_ELEMENTS = 4_000_000


def rank1_identification(embeddings: Any, identities: Sequence[str]) -> float | None:
    """Closed-set rank-1 identification rate, leave-one-out.

    Every image whose identity has at least 2 images is a probe; its gallery is all the
    other images (singletons included, as distractors). The nearest neighbour by cosine
    similarity of L2-normalised embeddings (float64; ties go to the lower index) must have
    the probe's identity.

    Args:
        embeddings: ndarray[N, D] raw embeddings (any scale; normalised here).
        identities: N identity labels, compared as given.

    Returns:
        Fraction of probes answered correctly, or ``None`` if no identity has >= 2 images.
        Memory: the similarity matrix is built in [chunk, N] blocks of at most 4M floats.
    """
    e = np.asarray(embeddings)
    if e.ndim != 2 or e.shape[1] == 0:
        raise ValueError(f"embeddings must be a 2-D array [N, D] with D >= 1; got shape {e.shape}")
    if not (np.issubdtype(e.dtype, np.integer) or np.issubdtype(e.dtype, np.floating)):
        raise ValueError(f"embeddings must hold real numbers; got dtype {e.dtype}")
    ids = np.asarray(list(identities))
    if ids.ndim != 1 or ids.shape[0] != e.shape[0]:
        raise ValueError(f"need one identity per embedding: {e.shape[0]} embeddings, "
                         f"{ids.shape[0] if ids.ndim else 0} identities")
    x = e.astype(np.float64)
    if not np.isfinite(x).all():
        row = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
        raise ValueError(f"embeddings[{row}] contains a non-finite value")
    norms = np.linalg.norm(x, axis=1)
    if (norms == 0).any():
        raise ValueError(f"embeddings[{int(np.flatnonzero(norms == 0)[0])}] is a zero vector")
    x /= norms[:, None]
    _, codes, counts = np.unique(ids, return_inverse=True, return_counts=True)
    codes = codes.reshape(-1)
    probes = np.flatnonzero(counts[codes] >= 2)
    if probes.shape[0] == 0:
        return None
    n = x.shape[0]
    step = max(1, _RANK1_CHUNK_ELEMENTS // n)
    correct = 0
    for p0 in range(0, probes.shape[0], step):
        p = probes[p0:p0 + step]
        sim = x[p] @ x.T
        sim[np.arange(p.shape[0]), p] = -np.inf  # leave the probe itself out
        correct += int(np.count_nonzero(codes[np.argmax(sim, axis=1)] == codes[p]))
    return correct / probes.shape[0]
