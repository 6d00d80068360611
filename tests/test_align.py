"""Alignment: the similarity transform, the template, residuals, the contact sheet."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.align import ARCFACE_TEMPLATE_112, align_face, apply_transform, contact_sheet, similarity_transform, template


def _similarity(angle: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[scale * c, -scale * s, shift[0]], [scale * s, scale * c, shift[1]]])


def _least_squares_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Reference without SVD: x' = a x - b y + tx, y' = b x + a y + ty is linear in
    (a, b, tx, ty), so the best non-reflective similarity is one linear least squares."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst):
        rows += [[x, -y, 1, 0], [y, x, 0, 1]]
        rhs += [u, v]
    a, b, tx, ty = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)[0]
    return np.array([[a, -b, tx], [b, a, ty]])


def test_recovers_a_known_similarity():
    truth = _similarity(0.3, 1.7, (12.0, -5.0))
    src = np.random.default_rng(0).random((5, 2)) * 100
    c, s = np.cos(0.3), np.sin(0.3)  # written out, not through apply_transform
    dst = np.stack([1.7 * (c * src[:, 0] - s * src[:, 1]) + 12.0, 1.7 * (s * src[:, 0] + c * src[:, 1]) - 5.0], 1)
    np.testing.assert_allclose(similarity_transform(src, dst), truth, atol=1e-9)
    np.testing.assert_allclose(apply_transform(truth, src), dst, atol=1e-12)


@pytest.mark.parametrize("case", ["noisy", "mirrored"])
def test_matches_the_least_squares_similarity(case):
    # The best proper similarity, also when only a reflection would fit exactly (mirrored
    # landmarks): same matrix as the linear least-squares reference, and never a reflection.
    rng = np.random.default_rng(4)
    src = ARCFACE_TEMPLATE_112 + rng.normal(0, 2.0, ARCFACE_TEMPLATE_112.shape)
    if case == "mirrored":
        dst = src.copy()
        dst[:, 0] = 112 - dst[:, 0]
    else:
        dst = src @ np.array([[0.9, 0.4], [-0.4, 0.9]]) + rng.normal(0, 3.0, src.shape) + 30
    matrix = similarity_transform(src, dst)
    np.testing.assert_allclose(matrix, _least_squares_similarity(src, dst), atol=1e-9)
    assert np.linalg.det(matrix[:, :2]) > 0


def test_template_scales_with_size():
    np.testing.assert_allclose(template(224), ARCFACE_TEMPLATE_112 * 2)
    assert template(112)[0].tolist() == pytest.approx([38.2946, 51.6963])


def test_align_puts_landmarks_on_template():
    # Landmarks of a face rotated by 20 degrees and scaled 2.5x inside a 400x400 image.
    truth = _similarity(np.deg2rad(20), 2.5, (80.0, 60.0))
    landmarks = apply_transform(truth, ARCFACE_TEMPLATE_112)
    image = np.zeros((400, 400, 3), dtype=np.uint8)
    for x, y in landmarks:
        image[int(round(y)) - 2 : int(round(y)) + 3, int(round(x)) - 2 : int(round(x)) + 3] = 255
    crop, residual = align_face(image, landmarks, 112)
    assert crop.shape == (112, 112, 3)
    assert residual < 1e-6
    for x, y in ARCFACE_TEMPLATE_112:  # the bright dots land on the template points
        assert crop[int(round(y)), int(round(x))].max() > 100
    noisy = landmarks + np.random.default_rng(1).normal(0, 3.0, landmarks.shape)
    _, noisy_residual = align_face(image, noisy, 112)
    assert 0.2 < noisy_residual < 5.0


def test_degenerate_landmarks_raise():
    with pytest.raises(ValueError, match="coincide"):
        similarity_transform(np.ones((5, 2)), ARCFACE_TEMPLATE_112)


def test_contact_sheet_shape():
    crops = [np.full((112, 112, 3), k * 20, dtype=np.uint8) for k in range(5)]
    sheet = contact_sheet(crops, [str(k) for k in range(5)], columns=4)
    assert sheet.shape == (2 * (112 + 12), 4 * 112, 3)
