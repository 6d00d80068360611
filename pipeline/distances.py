"""Pair scores from two embedding matrices (score stage).

Convention shared with :mod:`pipeline.metrics`: **higher score = more likely the same
identity**. Cosine similarity is used as is; for L2 the score is the *negative*
Euclidean distance (or negative squared distance with ``squared=True``).

Variants are named ``<kind>_<norm|raw>`` (``cosine_norm``, ``cosine_raw``,
``l2_norm``, ``l2_raw``; squared L2 is ``l2sq_norm`` / ``l2sq_raw``), where ``norm``
means every embedding is L2-normalised before the distance is taken.

Two sanity identities hold by construction and can be shown in a report:

* cosine is scale invariant, so ``cosine_norm`` equals ``cosine_raw``: cosine already
  divides by both norms, so both variants evaluate the same formula
  ``a.b / (||a|| ||b||)`` and give bit-identical scores (and metrics). A report showing
  them side by side therefore shows identical rows by construction.
* on unit vectors ``||a - b|| = sqrt(2 - 2 cos(a, b))`` is a decreasing function of the
  cosine, so ``l2_norm`` ranks pairs exactly like ``cosine_*`` (same AUC, up to ties
  created by rounding).

All arithmetic is done in float64, chunk by chunk, so memory stays bounded
(``chunk_size`` rows at a time) whatever the input dtype. The L2 distance is computed
from the difference vector (not from ``2 - 2 cos``), so it stays accurate for near
duplicates.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KINDS = ("cosine", "l2")


@dataclass(frozen=True)
class PairDistance:
    """One distance variant.

    Attributes:
        kind: ``"cosine"`` or ``"l2"``.
        normalize: L2-normalise each embedding (row) before scoring.
        squared: L2 only: score is ``-||a - b||^2`` instead of ``-||a - b||``
            (same ranking, so same ROC/AUC/accuracy; only thresholds differ).
        chunk_size: rows processed per float64 chunk; ``None`` picks about 2**18 numbers
            per chunk (cache-friendly).
    """

    kind: str = "cosine"
    normalize: bool = False
    squared: bool = False
    chunk_size: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"distance kind {self.kind!r} is not supported; allowed: {KINDS}")
        if self.squared and self.kind != "l2":
            raise ValueError(f"squared=True only applies to kind 'l2', not {self.kind!r}")
        if not isinstance(self.normalize, (bool, np.bool_)):
            raise ValueError(f"normalize must be a bool, got {self.normalize!r}")
        if self.chunk_size is not None and int(self.chunk_size) < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size!r}")

    @property
    def name(self) -> str:
        """Variant name, e.g. ``cosine_norm``, ``l2_raw``, ``l2sq_norm``."""
        kind = "l2sq" if self.squared else self.kind
        return f"{kind}_{'norm' if self.normalize else 'raw'}"

    @classmethod
    def from_name(cls, name: str) -> PairDistance:
        """Inverse of :attr:`name` (``"l2_norm"`` -> ``PairDistance("l2", True)``)."""
        kind, sep, norm = str(name).rpartition("_")
        if not sep or norm not in ("norm", "raw") or kind not in ("cosine", "l2", "l2sq"):
            raise ValueError(
                f"unknown distance variant {name!r}; allowed: cosine_norm, cosine_raw, "
                "l2_norm, l2_raw, l2sq_norm, l2sq_raw"
            )
        return cls(kind="l2" if kind == "l2sq" else kind, normalize=norm == "norm",
                   squared=kind == "l2sq")

    def scores(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Score N pairs of embeddings.

        Args:
            a: ndarray[N, D], embeddings of the first image of each pair (any real dtype).
            b: ndarray[N, D], embeddings of the second image, row i paired with ``a[i]``.

        Returns:
            ndarray[N] float64, higher = more similar. Cosine scores lie in [-1, 1]
            (clipped against rounding); L2 scores are ``-distance`` (<= 0), in the
            embedding's units (unit-sphere units when ``normalize``).

        Raises:
            ValueError: shapes differ or are not 2-D, D == 0, non-finite values, or a
                zero vector where a direction is needed (cosine, or ``normalize``).
        """
        a = _as_matrix(a, "a")
        b = _as_matrix(b, "b")
        if a.shape != b.shape:
            raise ValueError(
                f"a and b must have the same shape [N, D]; got {a.shape} and {b.shape}"
            )
        n = a.shape[0]
        out = np.empty(n, dtype=np.float64)
        step = int(self.chunk_size) if self.chunk_size else max(1, 2**18 // a.shape[1])
        for start in range(0, n, step):
            stop = min(start + step, n)
            out[start:stop] = self._chunk(a[start:stop], b[start:stop], start)
        return out

    __call__ = scores

    def _chunk(self, a: np.ndarray, b: np.ndarray, offset: int) -> np.ndarray:
        # einsum with dtype=float64 casts element-wise and accumulates in float64 without
        # materialising float64 copies of float32 inputs. Non-finite inputs always give a
        # non-finite norm or distance, so only the [n] results are checked; the inputs
        # are scanned just to name the offending row.
        f64 = np.float64
        if self.normalize or self.kind == "cosine":
            nx = np.sqrt(np.einsum("ij,ij->i", a, a, dtype=f64))
            ny = np.sqrt(np.einsum("ij,ij->i", b, b, dtype=f64))
            _check_result(nx, offset, (a, "a"))
            _check_result(ny, offset, (b, "b"))
            _check_nonzero(nx, "a", offset)
            _check_nonzero(ny, "b", offset)
        if self.kind == "cosine":
            dot = np.einsum("ij,ij->i", a, b, dtype=f64)
            return np.clip(dot / (nx * ny), -1.0, 1.0)  # normalize: same formula, see module doc
        if self.normalize:
            diff = np.divide(a, nx[:, None], dtype=f64)
            diff -= np.divide(b, ny[:, None], dtype=f64)
        else:
            diff = np.subtract(a, b, dtype=f64)
        sq = np.einsum("ij,ij->i", diff, diff)
        _check_result(sq, offset, (a, "a"), (b, "b"))
        return -sq if self.squared else -np.sqrt(sq)


def standard_variants() -> list[PairDistance]:
    """The four variants the score stage evaluates: {cosine, l2} x {norm, raw}."""
    return [PairDistance(kind, normalize) for kind in KINDS for normalize in (True, False)]


def _as_matrix(x: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array [N, D]; got shape {arr.shape}")
    if arr.shape[1] == 0:
        raise ValueError(f"{what} has zero embedding dimensions (shape {arr.shape})")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"{what} must hold real numbers; got dtype {arr.dtype}")
    return arr


def _check_result(values: np.ndarray, offset: int, *inputs: tuple[np.ndarray, str]) -> None:
    """Raise if ``values`` (one per row) is not finite, naming the input row at fault."""
    if np.isfinite(values).all():
        return
    for x, what in inputs:
        bad = ~np.isfinite(x)
        if bad.any():
            row = int(np.flatnonzero(bad.any(axis=1))[0])
            raise ValueError(f"{what}[{offset + row}] contains a non-finite value (NaN or inf)")
    row = int(np.flatnonzero(~np.isfinite(values))[0])
    raise ValueError(f"pair {offset + row}: values too large, the distance overflows float64")


def _check_nonzero(norms: np.ndarray, what: str, offset: int) -> None:
    zero = norms == 0
    if zero.any():
        row = int(np.flatnonzero(zero)[0])
        raise ValueError(
            f"{what}[{offset + row}] is a zero vector: cosine / L2 normalisation undefined"
        )
