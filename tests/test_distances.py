from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.distances import PairDistance, standard_variants


def _reference_score(x: np.ndarray, y: np.ndarray, kind: str, normalize: bool, squared: bool) -> float:
    """One pair's score by plain Python arithmetic (math.fsum), independent of pipeline.distances."""
    x = [float(v) for v in x]
    y = [float(v) for v in y]
    nx, ny = math.sqrt(math.fsum(v * v for v in x)), math.sqrt(math.fsum(v * v for v in y))
    if kind == "cosine":
        return math.fsum(u * v for u, v in zip(x, y)) / (nx * ny)
    if normalize:
        x, y = [v / nx for v in x], [v / ny for v in y]
    sq = math.fsum((u - v) ** 2 for u, v in zip(x, y))
    return -sq if squared else -math.sqrt(sq)


ALL_VARIANTS = [("cosine", False, False), ("cosine", True, False), ("l2", False, False),
                ("l2", True, False), ("l2", False, True), ("l2", True, True)]


def test_cosine_hand_computed() -> None:
    a = np.array([[1.0, 0.0], [3.0, 4.0], [1.0, 2.0]])
    b = np.array([[1.0, 1.0], [-3.0, -4.0], [2.0, 4.0]])
    for normalize in (False, True):  # cosine is scale invariant: the same values either way
        s = PairDistance("cosine", normalize).scores(a, b)
        np.testing.assert_allclose(s, [1 / math.sqrt(2), -1.0, 1.0], rtol=0, atol=1e-15)
    # rows of very different lengths, each compared with its own direction scaled
    a = np.array([[0.001, 0.002], [300.0, -400.0]])
    b = np.array([[2000.0, 4000.0], [0.6, 0.8]])  # [0.6, -0.8] . [0.6, 0.8] = -0.28
    for normalize in (False, True):
        np.testing.assert_allclose(PairDistance("cosine", normalize).scores(a, b), [1.0, -0.28], rtol=0, atol=1e-15)


def test_l2_hand_computed_raw_norm_and_squared() -> None:
    a = np.array([[3.0, 4.0], [2.0, 0.0]])
    b = np.array([[0.0, 0.0], [0.0, 5.0]])
    np.testing.assert_allclose(PairDistance("l2").scores(a, b), [-5.0, -math.sqrt(29)])
    np.testing.assert_allclose(PairDistance("l2", squared=True).scores(a, b), [-25.0, -29.0])
    # normalised: [0.6, 0.8] vs [0, 1] -> sqrt(0.36 + 0.04); [1, 0] vs [0, 1] -> sqrt(2)
    a2, b2 = a.copy(), np.array([[0.0, 3.0], [0.0, 5.0]])
    np.testing.assert_allclose(PairDistance("l2", normalize=True).scores(a2, b2),
                               [-math.sqrt(0.4), -math.sqrt(2.0)])
    np.testing.assert_allclose(PairDistance("l2", True, squared=True).scores(a2, b2), [-0.4, -2.0])


@pytest.mark.parametrize(("kind", "normalize", "squared"), ALL_VARIANTS)
def test_every_variant_matches_a_plain_python_reference(kind: str, normalize: bool, squared: bool) -> None:
    # rows of very different lengths, so a variant that skips (or wrongly applies) the
    # normalisation cannot match
    rng = np.random.default_rng(1)
    a = rng.normal(size=(300, 16)) * rng.uniform(0.1, 50, size=(300, 1))
    b = rng.normal(size=(300, 16)) * rng.uniform(0.1, 50, size=(300, 1))
    got = PairDistance(kind, normalize, squared=squared).scores(a, b)
    ref = np.array([_reference_score(x, y, kind, normalize, squared) for x, y in zip(a, b)])
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)
    if kind == "l2" and normalize and not squared:
        # on the unit sphere ||a - b|| = sqrt(2 - 2 cos): checked against the reference cosine
        cos = np.array([_reference_score(x, y, "cosine", False, False) for x, y in zip(a, b)])
        np.testing.assert_allclose(got, -np.sqrt(2 - 2 * cos), rtol=0, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 7, 103, None])
@pytest.mark.parametrize(("kind", "normalize", "squared"), ALL_VARIANTS)
def test_chunking_and_float32_inputs_accumulate_in_float64(kind: str, normalize: bool, squared: bool,
                                                           chunk_size: int | None) -> None:
    # float32 inputs, compared with the float64 reference on the same (exactly widened)
    # values: accumulating in float32 would be off by ~1e-7, a chunk written to the
    # wrong rows by O(1)
    rng = np.random.default_rng(2)
    a = rng.normal(size=(103, 8)).astype(np.float32)
    b = rng.normal(size=(103, 8)).astype(np.float32)
    got = PairDistance(kind, normalize, squared=squared, chunk_size=chunk_size).scores(a, b)
    assert got.dtype == np.float64 and got.shape == (103,)
    ref = np.array([_reference_score(x, y, kind, normalize, squared) for x, y in zip(a, b)])
    np.testing.assert_allclose(got, ref, rtol=1e-13, atol=1e-13)


def test_names_round_trip() -> None:
    names = [v.name for v in standard_variants()]
    assert names == ["cosine_norm", "cosine_raw", "l2_norm", "l2_raw"]
    for name in ("cosine_norm", "cosine_raw", "l2_norm", "l2_raw", "l2sq_norm", "l2sq_raw"):
        assert PairDistance.from_name(name).name == name
    assert PairDistance.from_name("l2sq_raw") == PairDistance("l2", False, squared=True)


def test_empty_input_gives_empty_scores() -> None:
    out = PairDistance("l2").scores(np.zeros((0, 4)), np.zeros((0, 4)))
    assert out.shape == (0,)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"kind": "manhattan"}, "manhattan"), ({"kind": "cosine", "squared": True}, "squared")],
)
def test_bad_configuration(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PairDistance(**kwargs)
    with pytest.raises(ValueError, match="unknown distance variant"):
        PairDistance.from_name("cosine_unit")


def test_bad_inputs_are_named() -> None:
    d = PairDistance("cosine")
    with pytest.raises(ValueError, match="same shape"):
        d.scores(np.ones((3, 2)), np.ones((4, 2)))
    with pytest.raises(ValueError, match="2-D"):
        d.scores(np.ones(3), np.ones(3))
    bad = np.ones((5, 2))
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"b\[3\].*non-finite"):
        PairDistance("l2", chunk_size=2).scores(np.ones((5, 2)), bad)
    zero = np.ones((4, 2))
    zero[2] = 0.0
    with pytest.raises(ValueError, match=r"a\[2\] is a zero vector"):
        d.scores(zero, np.ones((4, 2)))
    with pytest.raises(ValueError, match=r"a\[2\] is a zero vector"):
        PairDistance("l2", normalize=True).scores(zero, np.ones((4, 2)))
    with pytest.raises(ValueError, match=r"a\[1\] contains a non-finite"):
        d.scores(np.array([[1.0, 2.0], [np.inf, 0.0]]), np.ones((2, 2)))
    with pytest.raises(ValueError, match="overflows"):
        PairDistance("l2").scores(np.full((1, 2), 1e300), np.full((1, 2), -1e300))
    # raw L2 does not need a direction, so a zero vector is fine
    assert PairDistance("l2").scores(zero, np.ones((4, 2)))[2] == -math.sqrt(2)
