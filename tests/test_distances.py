from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.distances import PairDistance, standard_variants


def test_cosine_hand_computed() -> None:
    a = np.array([[1.0, 0.0], [3.0, 4.0], [1.0, 2.0]])
    b = np.array([[1.0, 1.0], [-3.0, -4.0], [2.0, 4.0]])
    s = PairDistance("cosine").scores(a, b)
    np.testing.assert_allclose(s, [1 / math.sqrt(2), -1.0, 1.0], rtol=0, atol=1e-15)


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


def test_cosine_is_invariant_to_normalisation_and_l2_norm_follows_cosine() -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(size=(500, 16)) * rng.uniform(0.1, 50, size=(500, 1))
    b = rng.normal(size=(500, 16)) * rng.uniform(0.1, 50, size=(500, 1))
    cos_raw = PairDistance("cosine", False).scores(a, b)
    cos_norm = PairDistance("cosine", True).scores(a, b)
    np.testing.assert_array_equal(cos_norm, cos_raw)  # same formula by construction
    l2n = PairDistance("l2", True).scores(a, b)
    np.testing.assert_allclose(l2n, -np.sqrt(2 - 2 * cos_raw), rtol=0, atol=1e-12)
    # independent reference for the raw scores
    ref = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    np.testing.assert_allclose(cos_raw, ref, rtol=0, atol=1e-14)
    np.testing.assert_allclose(PairDistance("l2").scores(a, b), -np.linalg.norm(a - b, axis=1))


def test_chunking_and_float32_inputs_accumulate_in_float64() -> None:
    rng = np.random.default_rng(2)
    a = rng.normal(size=(103, 8)).astype(np.float32)
    b = rng.normal(size=(103, 8)).astype(np.float32)
    for variant in standard_variants():
        small = PairDistance(variant.kind, variant.normalize, chunk_size=7).scores(a, b)
        whole = variant.scores(a.astype(np.float64), b.astype(np.float64))
        assert small.dtype == np.float64 and small.shape == (103,)
        np.testing.assert_allclose(small, whole, rtol=0, atol=1e-15)


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
