"""1:N identification: probe templates against a gallery (IJB), and probes against distractors (MegaFace).

**Templates** (:func:`search_gallery`, :func:`identification_metrics`): each probe template is
compared (cosine of unit features) with every gallery template. A probe is *mated* when its subject
has a gallery template; its rank is 1 + the number of non-mate gallery templates scoring strictly
above its best mate (a tie goes to the mate). CMC at rank r: share of mated probes with rank <= r
(closed set). Open set (IJB's protocol; probes of subjects not in the gallery are non-mated): at
FPIR ``f`` the threshold rejects all but ``floor(f * n_nonmated)`` of the non-mated probes' top
scores, and TPIR is the share of mated probes whose mate is at rank 1 and scores above it (the
conventions of :mod:`pipeline.protocols.verification`).

**Distractors** (:func:`distractor_search`): every ordered pair (probe image p, other image g of its
identity) is a search of p in a gallery of g plus the first N distractors; p's rank is 1 + the
number of those distractors scoring strictly above s(p, g). The distractors are read in chunks:
``probes @ chunk.T`` (float32, PyTorch with the process's threads), a running top-k per probe
(snapshotted at each N) and a running top-M of every probe x distractor score (M = the impostor
scores the FPR level needs), so no probes x gallery matrix is ever held. The verification against
the distractors takes the genuine pairs (unordered, within an identity) and every probe x
distractor pair as impostors.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch

from pipeline.protocols.verification import supported, tpr_at_fprs


def unit_rows(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, float32 (zero rows stay zero)."""
    x = np.array(features, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


# --------------------------------------------------------------------------- templates (IJB)
@dataclass
class GallerySearch:
    """Per probe [Q]: ``mated`` (its subject is in the gallery), ``rank`` (of its best mate; 0 for a
    non-mated probe), ``mate_score`` (-inf when non-mated) and ``top_score`` (best gallery score)."""

    subjects: np.ndarray
    mated: np.ndarray
    rank: np.ndarray
    mate_score: np.ndarray
    top_score: np.ndarray


def search_gallery(probe_feats: np.ndarray, probe_subjects: np.ndarray, gallery_feats: np.ndarray,
                   gallery_subjects: np.ndarray, *, chunk: int = 4096) -> GallerySearch:
    """Search every probe [Q, D] in the gallery [G, D] (unit rows), ``chunk`` probes at a time (numpy)."""
    probe_subjects = np.asarray(probe_subjects)
    gallery = np.ascontiguousarray(gallery_feats, dtype=np.float32)
    gallery_subjects = np.asarray(gallery_subjects)
    q = len(probe_subjects)
    rank = np.zeros(q, dtype=np.int64)
    mate = np.full(q, -np.inf, dtype=np.float32)
    top = np.empty(q, dtype=np.float32)
    for s in range(0, q, chunk):
        sims = np.asarray(probe_feats[s:s + chunk], dtype=np.float32) @ gallery.T
        is_mate = gallery_subjects[None, :] == probe_subjects[s:s + chunk, None]
        best = np.where(is_mate, sims, -np.inf).max(1).astype(np.float32)
        beaten = ((sims > best[:, None]) & ~is_mate).sum(1)
        rank[s:s + chunk] = np.where(is_mate.any(1), beaten + 1, 0)
        mate[s:s + chunk] = best
        top[s:s + chunk] = sims.max(1)
    return GallerySearch(probe_subjects, rank > 0, rank, mate, top)


def identification_metrics(search: GallerySearch, ranks: Sequence[int], fpirs: Sequence[float]) -> dict:
    """CMC at ``ranks`` over the mated probes and TPIR at each FPIR (None where the non-mated probes
    are too few for the level, or there are none); counts of mated and non-mated probes."""
    mated_rank = search.rank[search.mated]
    cmc = {int(r): (float((mated_rank <= r).mean()) if len(mated_rank) else None) for r in ranks}
    non_mated = np.sort(search.top_score[~search.mated])[::-1]
    hits = np.sort(search.mate_score[search.mated & (search.rank == 1)])
    tpir, thresholds = tpr_at_fprs(non_mated, len(non_mated), hits, fpirs, n_pos=int(search.mated.sum()))
    return {"cmc": cmc, "tpir": tpir, "tpir_thresholds": thresholds, "n_mated": int(search.mated.sum()),
            "n_non_mated": int((~search.mated).sum())}


# ------------------------------------------------------------------------ distractors (MegaFace)
@dataclass
class DistractorResult:
    """What :func:`distractor_search` measured.

    ``sizes``: the gallery sizes N; ``cmc``: N -> {rank r: share of (probe, mate) searches with rank
    <= r}; ``pair_probe``, ``pair_gallery``, ``pair_identity`` [S]: the probe, its mate and their
    identity code, per search;
    ``correct`` [S] bool: rank 1 at the largest N. ``tpr``: FPR level -> TPR against the distractors
    (None where the impostor pairs do not support it); ``n_genuine``, ``n_impostor``: its pair counts.
    ``timing``: seconds of the similarity phase (products and top-k) and of the products alone, and
    the GFLOP of the products.
    """

    sizes: list[int]
    cmc: dict[int, dict[int, float]]
    pair_probe: np.ndarray
    pair_gallery: np.ndarray
    pair_identity: np.ndarray
    correct: np.ndarray
    tpr: dict[float, float | None]
    threshold: dict[float, float | None]
    n_genuine: int
    n_impostor: int
    timing: dict[str, float] = field(default_factory=dict)


def _genuine(probes: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ordered pairs (p, g), p != g, of the same identity: ``(p [S], g [S], score [S] float32)``."""
    ps, gs, ss = [], [], []
    for code in np.unique(codes):
        members = np.flatnonzero(codes == code)
        if len(members) < 2:
            continue
        block = probes[members] @ probes[members].T
        a, b = np.nonzero(~np.eye(len(members), dtype=bool))
        ps.append(members[a])
        gs.append(members[b])
        ss.append(block[a, b])
    if not ps:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(ps), np.concatenate(gs), np.concatenate(ss).astype(np.float32)


def _bounds(n: int, sizes: Sequence[int], chunk: int) -> tuple[list[int], list[int]]:
    """Chunk ends over [0, n) that include every size, and the sizes kept (<= n, n added)."""
    kept = sorted({s for s in sizes if s < n} | {n})
    return sorted(set(range(chunk, n, chunk)) | set(kept)), kept


def _ranks_from_top(top: "torch.Tensor", pair_probe: np.ndarray, pair_score: np.ndarray) -> np.ndarray:
    """1 + distractors above each search's genuine score (K + 1 when all K kept ones are above)."""
    above = np.zeros(len(pair_probe), dtype=np.int64)
    top = top.numpy()
    step = 1 << 16
    for s in range(0, len(pair_probe), step):
        rows = top[pair_probe[s:s + step]]
        above[s:s + step] = (rows > pair_score[s:s + step, None]).sum(1)
    return above + 1


def _merge_impostors(neg: "torch.Tensor", floor: float, m: int, sims: "torch.Tensor", chunk_top: "torch.Tensor"
                     ) -> tuple["torch.Tensor", float]:
    """Fold a chunk's scores into the running top-``m`` impostor scores ``neg`` (descending; ``floor``
    its m-th value once full). Only rows whose k-th chunk score is above the floor can hold more
    candidates than their chunk top-k, so only those rows are scanned whole."""
    import torch

    full_rows = chunk_top[:, -1] > floor
    parts = [neg, chunk_top[~full_rows][chunk_top[~full_rows] > floor]]
    if full_rows.any():
        rows = sims[full_rows]
        parts.append(rows[rows > floor])
    merged = torch.cat(parts)
    if merged.numel() == neg.numel():
        return neg, floor
    neg = torch.topk(merged, min(m, merged.numel())).values
    return neg, (float(neg[-1]) if neg.numel() == m else -math.inf)


def distractor_search(probe_feats: np.ndarray, probe_identities: Sequence, distractors: np.ndarray, *,
                      sizes: Sequence[int], max_rank: int = 10, fprs: Sequence[float] = (1e-6,),
                      chunk: int = 8192, progress: bool = False) -> DistractorResult:
    """The MegaFace protocol: probes [P, D] (any scale; normalised here) with their identities,
    distractors [N, D] (an array or a memory map; each chunk is normalised as it is read)."""
    import torch
    from tqdm import tqdm

    codes = np.unique(np.asarray(probe_identities), return_inverse=True)[1].reshape(-1)
    unit = unit_rows(probe_feats)
    probes = torch.from_numpy(unit)
    pair_probe, pair_gallery, pair_score = _genuine(unit, codes)
    if len(pair_probe) == 0:
        raise ValueError("no identity has two probe images: there is nothing to search")
    keep = pair_probe < pair_gallery  # unordered genuine pairs for the verification
    genuine = np.sort(pair_score[keep])
    n, p = len(distractors), len(codes)
    ends, kept = _bounds(n, sizes, chunk)
    need = {f: math.floor(f * p * n + 1e-9) + 1 for f in fprs if supported(f, p * n)}
    m = max(need.values(), default=0)
    top = torch.full((p, max_rank), -math.inf)
    neg, floor = torch.empty(0), -math.inf
    cmc: dict[int, dict[int, float]] = {}
    matmul_s, start_all, begin = 0.0, time.perf_counter(), 0
    for end in tqdm(ends, desc="distractors", unit="chunk", disable=not progress):
        block = torch.from_numpy(unit_rows(distractors[begin:end]))
        t0 = time.perf_counter()
        sims = probes @ block.T
        matmul_s += time.perf_counter() - t0
        chunk_top = torch.topk(sims, min(max_rank, sims.shape[1]), dim=1).values  # [P, k] descending
        top = torch.topk(torch.cat([top, chunk_top], 1), max_rank, dim=1).values
        if m:
            neg, floor = _merge_impostors(neg, floor, m, sims, chunk_top)
        if end in kept:
            ranks = _ranks_from_top(top, pair_probe, pair_score)
            cmc[end] = {r: float((ranks <= r).mean()) for r in range(1, max_rank + 1)}
        begin = end
    similarity_s = time.perf_counter() - start_all
    neg_desc = neg.numpy()
    tpr, thresholds = tpr_at_fprs(neg_desc, p * n, genuine, fprs)
    timing = {"similarity_s": similarity_s, "matmul_s": matmul_s, "gflop": 2.0 * p * n * probes.shape[1] / 1e9}
    return DistractorResult(kept, cmc, pair_probe, pair_gallery, codes[pair_probe], ranks == 1, tpr, thresholds,
                            int(keep.sum()), p * n, timing)
