"""Every loss recomputed by hand (numpy, float64) from its formula, via the public API."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from pipeline import losses
from pipeline.losses import NonFiniteLossError, build, check_finite
from pipeline.samplers import PKBatchSampler

PI = math.pi


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny tensors: intra-op threads only contend on a busy machine (30x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- numpy references
def np_cos(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    wn = w / np.linalg.norm(w, axis=1, keepdims=True)
    return xn @ wn.T


def np_ce(logits: np.ndarray, y: np.ndarray) -> float:
    top = logits.max(axis=1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    return float(np.mean(lse - logits[np.arange(len(y)), y]))


def np_psi(theta: np.ndarray, m: int) -> np.ndarray:
    k = np.clip(np.floor(m * theta / PI), 0, m - 1)
    return (-1.0) ** k * np.cos(m * theta) - 2.0 * k


def np_target(name: str, cos: np.ndarray, p: dict) -> np.ndarray:
    """Margin applied to the true-class cos(theta), straight from the formulas (unscaled)."""
    theta = np.arccos(np.clip(cos, -1.0, 1.0))
    if name in ("normface", "intra", "inter"):
        return cos
    if name == "cosface":
        return cos - p["margin"]
    if name in ("arcface", "subcenter"):
        m = p["margin"]
        exact = np.cos(theta + m)
        if p.get("easy_margin"):
            return np.where(cos > 0, exact, cos)
        return np.where(theta + m <= PI, exact, cos - m * np.sin(m))
    if name == "combined":
        m1, m2, m3 = p["m1"], p["m2"], p["m3"]
        angle = m1 * theta + m2
        theta_star = (PI - m2) / m1
        fallback = cos - (PI - theta_star) * np.sin(theta_star) - m3
        return np.where(angle <= PI, np.cos(angle) - m3, fallback)
    raise AssertionError(name)


def np_sphere_lambda(p: dict, iteration: int, total_steps: int = 0) -> float:
    """SphereFace's lambda from the docstring formulas (caffe; fraction = caffe curve reaching the floor at T)."""
    base, low, power = p["lambda_base"], p["lambda_min"], p["lambda_power"]
    if p["lambda_schedule"] == "caffe":
        return max(low, base * (1 + p["lambda_gamma"] * iteration) ** (-power))
    end = p["lambda_warmup_fraction"] * total_steps
    if iteration == 0 or base <= low:
        return max(low, base)
    if iteration >= end:
        return low
    rate = ((base / low) ** (1 / power) - 1) / end
    return max(low, base * (1 + rate * iteration) ** (-power))


def np_logits(name: str, x: np.ndarray, w: np.ndarray, y: np.ndarray, p: dict, iteration: int = 0,
              total_steps: int = 0) -> np.ndarray:
    if name == "subcenter":
        k = p["subcenters"]
        cos = np_cos(x, w).reshape(len(x), -1, k).max(axis=2)
    else:
        cos = np_cos(x, w)
    rows = np.arange(len(y))
    out = cos.copy()
    if name == "sphereface":
        lam = np_sphere_lambda(p, iteration, total_steps)
        theta = np.arccos(np.clip(cos[rows, y], -1, 1))
        out[rows, y] = (lam * cos[rows, y] + np_psi(theta, p["margin"])) / (1 + lam)
        return out * np.linalg.norm(x, axis=1, keepdims=True)
    out[rows, y] = np_target(name, cos[rows, y], p)
    return out * p["scale"]


def np_regularizer(name: str, x: np.ndarray, w: np.ndarray, y: np.ndarray) -> float:
    if name == "intra":
        cos = np_cos(x, w)[np.arange(len(y)), y]
        return float(np.arccos(np.clip(cos, -1, 1)).mean() / PI)
    if name == "inter":
        ang = np.arccos(np.clip(np_cos(w, w), -1, 1))
        c = len(w)
        per = [(ang[yi].sum() - ang[yi, yi]) / (c - 1) for yi in y]
        return -float(np.mean(per)) / PI
    return 0.0


def batch(n: int = 24, d: int = 8, c: int = 5, seed: int = 0, loss=None):
    """Random embeddings; half of them placed near the opposite of their class weight
    (theta near pi) so the margin fallbacks are exercised."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    x = torch.randn(n, d, generator=g) * 2.0
    if loss is not None:
        w = loss.weight.detach()
        if w.shape[0] != c:  # subcenter: first sub-centre of each class
            w = w.view(c, -1, d)[:, 0]
        half = n // 2
        x[:half] = -3.0 * w[y[:half]] / w[y[:half]].norm(dim=1, keepdim=True) + 0.4 * torch.randn(half, d, generator=g)
    return x, y


MARGIN_CASES = [
    ("normface", {"scale": 64.0}),
    ("normface", {"scale": 20.0}),
    ("cosface", {}),
    ("arcface", {}),
    ("arcface", {"margin": 0.8, "scale": 30.0}),
    ("arcface", {"easy_margin": True}),
    ("combined", {"m1": 1.0, "m2": 0.3, "m3": 0.2}),  # CM1
    ("combined", {"m1": 0.9, "m2": 0.4, "m3": 0.15}),  # CM2
    ("combined", {"m1": 1.35, "m2": 0.1, "m3": 0.05}),
    ("subcenter", {}),
    ("sphereface", {}),  # fraction schedule, mid-decay (iteration 37 of T = 50)
    ("sphereface", {"margin": 3}),
    ("sphereface", {"lambda_schedule": "caffe"}),
    ("sphereface", {"lambda_warmup_fraction": 0.2, "lambda_power": 2.0}),  # past T = 20: the floor
    ("intra", {}),
    ("inter", {}),
]


@pytest.mark.parametrize(("name", "params"), MARGIN_CASES)
def test_margin_logits_and_loss_match_numpy(name: str, params: dict) -> None:
    torch.manual_seed(1)
    loss = build(name, num_classes=5, embedding_size=8, **params)
    iteration = total_steps = 0
    if name == "sphereface":
        loss.begin_training(100)
        loss.iteration.fill_(37)
        iteration, total_steps = 37, 100
    x, y = batch(loss=loss)
    p = losses.validate_params(name, params)
    w = loss.weight.detach().double().numpy()
    ref_logits = np_logits(name, x.double().numpy(), w, y.numpy(), p, iteration, total_steps)
    got = loss.logits(x, y).detach().double().numpy()
    assert got.shape == (24, 5)
    np.testing.assert_allclose(got, ref_logits, rtol=1e-5, atol=1e-4)
    loss.eval()  # sphereface: do not advance the counter
    ref_loss = np_ce(ref_logits, y.numpy()) + np_regularizer(name, x.double().numpy(), w, y.numpy())
    assert float(loss(x, y).detach()) == pytest.approx(ref_loss, rel=1e-5, abs=1e-4)


def test_random_batch_hits_the_arcface_fallback() -> None:
    """Guard on the test above: the batch really has targets past theta = pi - m."""
    loss = build("arcface", 5, 8)
    x, y = batch(loss=loss)
    cos = np_cos(x.numpy().astype(np.float64), loss.weight.detach().double().numpy())[np.arange(24), y.numpy()]
    assert (np.arccos(cos) > PI - 0.5).sum() >= 3
    assert (np.arccos(cos) < PI - 0.5).sum() >= 3


# ---------------------------------------------------------------- known angles in 2-D
def known_angle_logits(name: str, thetas: list[float], radius: float = 1.0, **params) -> torch.Tensor:
    """Class weights at angles 0, 2.0, 4.0 rad; embeddings of class 0 at ``thetas``."""
    loss = build(name, num_classes=3, embedding_size=2, **params)
    angles = torch.tensor([0.0, 2.0, 4.0], dtype=torch.float64)
    if name == "subcenter":
        angles = angles.repeat_interleave(loss.hparams["subcenters"])
    with torch.no_grad():
        loss.weight.copy_(torch.stack([angles.cos(), angles.sin()], dim=1) * 5.0)
    t = torch.tensor(thetas, dtype=torch.float64)
    x = (torch.stack([t.cos(), t.sin()], dim=1) * radius).float()
    return loss.logits(x, torch.zeros(len(thetas), dtype=torch.int64)).detach().double()


THETAS = [0.3, 1.2, 2.9]


def test_arcface_known_angles() -> None:
    logits = known_angle_logits("arcface", THETAS)
    # theta = 2.9 > pi - 0.5: fallback cos(2.9) - 0.5*sin(0.5)
    expected = [44.589229398, -8.246047635, -77.482939805]
    np.testing.assert_allclose(logits[:, 0], expected, atol=1e-4)
    # the other classes see plain s*cos(theta - angle_j)
    np.testing.assert_allclose(logits[:, 1], [64 * math.cos(t - 2.0) for t in THETAS], atol=1e-4)
    np.testing.assert_allclose(logits[:, 2], [64 * math.cos(t - 4.0) for t in THETAS], atol=1e-4)


def test_arcface_easy_margin_known_angles() -> None:
    logits = known_angle_logits("arcface", THETAS, easy_margin=True)
    np.testing.assert_allclose(
        logits[:, 0], [64 * math.cos(0.8), 64 * math.cos(1.7), 64 * math.cos(2.9)], atol=1e-4
    )  # margin only where cos(theta) > 0, i.e. theta < pi/2; no fallback at 2.9


def test_cosface_and_normface_known_angles() -> None:
    cos = np.cos(THETAS)
    np.testing.assert_allclose(known_angle_logits("cosface", THETAS)[:, 0], 64 * (cos - 0.35), atol=1e-4)
    np.testing.assert_allclose(known_angle_logits("normface", THETAS, scale=20.0)[:, 0], 20 * cos, atol=1e-4)


def test_combined_cm1_cm2_known_angles() -> None:
    cm1 = known_angle_logits("combined", THETAS, m1=1.0, m2=0.3, m3=0.2)[:, 0]
    # theta = 2.9 > pi - 0.3 = 2.8416: fallback cos(2.9) - 0.3*sin(pi - 0.3) - 0.2
    np.testing.assert_allclose(
        cm1, [64 * (math.cos(0.6) - 0.2), 64 * (math.cos(1.5) - 0.2), -80.615310532], atol=1e-4
    )
    cm2 = known_angle_logits("combined", [0.3, 1.2, 2.9, 3.1], m1=0.9, m2=0.4, m3=0.15)[:, 0]
    # 0.9*2.9 + 0.4 = 3.01 < pi: exact; 0.9*3.1 + 0.4 = 3.19 > pi: fallback past theta* = 3.04621
    expected = [64 * (math.cos(0.67) - 0.15), 64 * (math.cos(1.48) - 0.15), -73.046667133, -74.125980157]
    np.testing.assert_allclose(cm2, expected, atol=1e-4)


def test_subcenter_known_angles_use_the_best_subcenter() -> None:
    loss = build("subcenter", num_classes=2, embedding_size=2, subcenters=3)
    assert tuple(loss.weight.shape) == (6, 2)
    # class 0 sub-centres at 1.0, 0.2, 2.5 rad; class 1 sub-centres at 3.0, 3.5, 4.0 rad
    angles = torch.tensor([1.0, 0.2, 2.5, 3.0, 3.5, 4.0])
    with torch.no_grad():
        loss.weight.copy_(torch.stack([angles.cos(), angles.sin()], dim=1))
    x = torch.tensor([[math.cos(0.5), math.sin(0.5)]])
    logits = loss.logits(x, torch.tensor([0]))
    assert logits.shape == (1, 2)
    # closest class-0 sub-centre is at 0.2 rad: theta = 0.3; class 1 closest at 3.0: theta = 2.5
    logits = logits.detach()
    assert float(logits[0, 0]) == pytest.approx(64 * math.cos(0.3 + 0.5), abs=1e-4)
    assert float(logits[0, 1]) == pytest.approx(64 * math.cos(2.5), abs=1e-4)


@pytest.mark.parametrize("m", [0.5, 0.8, 1.5, losses.MAX_MONOTONE_MARGIN])
def test_arcface_target_is_monotone_in_theta(m: float) -> None:
    thetas = np.linspace(0.0, PI, 400).tolist()
    target = known_angle_logits("arcface", thetas, margin=m, scale=1.0)[:, 0].numpy()
    assert np.all(np.diff(target) <= 1e-6)


@pytest.mark.parametrize(("m1", "m2", "m3"), [(1.0, 0.3, 0.2), (0.9, 0.4, 0.15), (1.35, 0.0, 0.0), (2.0, 0.5, 0.1)])
def test_combined_target_is_monotone_in_theta(m1: float, m2: float, m3: float) -> None:
    thetas = np.linspace(0.0, PI, 400).tolist()
    target = known_angle_logits("combined", thetas, m1=m1, m2=m2, m3=m3, scale=1.0)[:, 0].numpy()
    assert np.all(np.diff(target) <= 1e-6)


@pytest.mark.parametrize(
    ("special", "params"),
    [
        ("arcface", {"margin": 0.5}),
        ("arcface", {"margin": 1.2}),
        ("cosface", {"margin": 0.35}),
        ("normface", {}),
    ],
)
def test_combined_reduces_to_arcface_cosface_normface(special: str, params: dict) -> None:
    m = params.get("margin", 0.0)
    m1, m2, m3 = {"arcface": (1.0, m, 0.0), "cosface": (1.0, 0.0, m), "normface": (1.0, 0.0, 0.0)}[special]
    torch.manual_seed(3)
    ref = build(special, 5, 8, scale=30.0, **params)
    comb = build("combined", 5, 8, scale=30.0, m1=m1, m2=m2, m3=m3)
    with torch.no_grad():
        comb.weight.copy_(ref.weight)
    x, y = batch(loss=ref, seed=5)
    torch.testing.assert_close(comb.logits(x, y), ref.logits(x, y), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(comb(x, y), ref(x, y), atol=1e-4, rtol=1e-5)


def np_max_excess(m1: float, m2: float, m3: float, n: int = 200_001) -> float:
    """Brute force: max over theta in [0, pi] of (exact-branch target - cos theta)."""
    theta = np.linspace(0.0, PI, n)
    angle = m1 * theta + m2
    exact = angle <= PI  # the fallback subtracts a non-negative amount from cos(theta)
    return float(np.max((np.cos(angle) - m3 - np.cos(theta))[exact]))


@pytest.mark.parametrize(
    ("m1", "m2", "m3"),
    [
        (1.0, 0.3, 0.2),  # CM1
        (0.9, 0.4, 0.15),  # CM2: 0.9*theta + 0.4 >= theta for theta <= 4 > pi
        (0.9, 0.4, 0.0),  # CM2 without m3: still no angle is shrunk
        (1.0, 0.0, 0.0),  # normface: margin 0 everywhere
        (0.9, 0.1 * PI, 0.0),  # angle shrunk nowhere before pi, margin 0 exactly at pi
        (0.95, 0.1, 0.2),  # angle shrunk past theta = 2, but m3 covers the excess (0.016)
        (0.5, 0.0, 1.13),  # excess 1.125 (at theta = 2 acos(1/4)) covered by m3
    ],
)
def test_combined_accepts_settings_without_a_negative_margin(m1: float, m2: float, m3: float) -> None:
    losses.validate_params("combined", {"m1": m1, "m2": m2, "m3": m3})
    assert np_max_excess(m1, m2, m3) <= 1e-9
    thetas = np.linspace(0.0, PI, 1001).tolist()
    target = known_angle_logits("combined", thetas, m1=m1, m2=m2, m3=m3, scale=1.0)[:, 0].numpy()
    assert np.all(target <= np.cos(thetas) + 1e-6)


@pytest.mark.parametrize(
    ("m1", "m2", "m3", "excess"),
    [
        (0.5, 0.0, 0.0, 1.125),  # cos(t/2) - cos(t) peaks at t = 2 acos(1/4): 1/4 + 7/8
        (0.9, 0.0, 0.0, None),
        (0.95, 0.1, 0.0, None),  # shrunk past theta = 2
        (0.5, 0.0, 1.12, 0.005),  # m3 nearly but not quite enough
        (0.7, 0.0, 0.3, None),  # excess 0.63, m3 = 0.3 not enough
    ],
)
def test_combined_rejects_a_negative_margin_naming_the_params(m1, m2, m3, excess) -> None:
    expected = np_max_excess(m1, m2, m3)
    assert expected > 1e-4  # the setting really makes the target logit exceed cos(theta)
    if excess is not None:
        assert expected == pytest.approx(excess, abs=1e-6)
    for attempt in (lambda: losses.validate_params("combined", {"m1": m1, "m2": m2, "m3": m3}),
                    lambda: build("combined", 5, 8, m1=m1, m2=m2, m3=m3)):
        with pytest.raises(ValueError) as err:
            attempt()
        message = str(err.value)
        assert "\n" not in message
        assert message.startswith(f"combined: (m1, m2, m3) = ({m1}, {m2}, {m3}) give a negative margin")
        reported = float(message.split("by up to ")[1].split(" ")[0])
        assert reported == pytest.approx(expected, abs=1e-4)


def test_combined_negative_margin_rule_matches_brute_force_on_a_sweep() -> None:
    rng = np.random.default_rng(0)
    seen = {True: 0, False: 0}
    for m1, m2, m3 in zip(rng.uniform(0.3, 1.3, 300), rng.uniform(0.0, 1.2, 300), rng.uniform(0.0, 0.6, 300)):
        m1, m2, m3 = float(m1), float(m2), float(m3)
        excess = np_max_excess(m1, m2, m3, n=20_001)
        if abs(excess) < 1e-3 or (m1 * PI + m2 > PI and (PI - m2) / m1 < PI - losses.MAX_MONOTONE_MARGIN):
            continue  # too close to call on the grid, or rejected by the fallback rule
        try:
            losses.validate_params("combined", {"m1": m1, "m2": m2, "m3": m3})
            accepted = True
        except ValueError as err:
            assert "negative margin" in str(err)
            accepted = False
        assert accepted == (excess <= 0), (m1, m2, m3, excess)
        seen[accepted] += 1
    assert min(seen.values()) > 30, seen


# ---------------------------------------------------------------- gradients at cos = +-1
@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("arcface", {}),
        ("arcface", {"easy_margin": True}),
        ("cosface", {}),
        ("normface", {}),
        ("sphereface", {}),
        ("combined", {"m1": 1.0, "m2": 0.3, "m3": 0.2}),
        ("combined", {"m1": 0.9, "m2": 0.4, "m3": 0.15}),
        ("subcenter", {}),
        ("intra", {}),
        ("inter", {}),
    ],
)
@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("exact", [True, False])
def test_gradients_finite_at_cos_plus_minus_one(name: str, params: dict, sign: float, exact: bool) -> None:
    """``exact``: axis-aligned weights, so float32 cos is exactly +-1 (acos' is infinite there)."""
    torch.manual_seed(0)
    loss = build(name, num_classes=4, embedding_size=6, **params)
    loss.begin_training(10)
    labels = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        if exact:
            loss.weight.copy_(3.0 * torch.eye(6)[torch.arange(loss.weight.shape[0]) % 6])
        if name == "subcenter":  # all sub-centres of a class equal, so cos is exactly +-1
            k = loss.hparams["subcenters"]
            loss.weight.copy_(loss.weight.view(4, k, 6)[:, :1].expand(4, k, 6).reshape(-1, 6))
            centres = loss.weight.view(4, k, 6)[:, 0]
        else:
            centres = loss.weight
        x = (sign * 2.0 * centres[labels]).clone().requires_grad_(True)
    cos_target = np_cos(x.detach().double().numpy(), centres.detach().double().numpy())[np.arange(4), labels.numpy()]
    np.testing.assert_allclose(cos_target, sign, atol=1e-6)
    if exact:
        assert torch.all(loss.cosine(x.detach()).gather(1, labels.view(-1, 1)) == sign)
    value = loss(x, labels)
    value.backward()
    assert torch.isfinite(value)
    assert torch.isfinite(x.grad).all()
    assert torch.isfinite(loss.weight.grad).all()


# ---------------------------------------------------------------- sphereface
def test_sphereface_psi_piecewise_values_m4() -> None:
    thetas = torch.tensor([0.0, 0.3, 1.0, 2.0, 3.0, PI], dtype=torch.float64)
    got = losses.psi(thetas.cos(), 4).numpy()
    # k = 0, 0, 1, 2, 3, 3  ->  (-1)^k cos(4 theta) - 2k
    expected = [1.0, 0.362357754, -1.346356379, -4.145500034, -6.843853959, -7.0]
    np.testing.assert_allclose(got, expected, atol=1e-6)
    grid = torch.linspace(0, PI, 2001, dtype=torch.float64)
    values = losses.psi(grid.cos(), 4)
    assert torch.all(values[1:] <= values[:-1] + 1e-9)  # monotone and continuous
    assert float((values[1:] - values[:-1]).abs().max()) < 0.02


def test_sphereface_target_is_norm_times_psi_without_lambda() -> None:
    thetas = [0.3, 1.0, 2.0, 3.0]
    logits = known_angle_logits("sphereface", thetas, radius=2.0, lambda_base=0.0, lambda_min=0.0)
    expected = 2.0 * np_psi(np.array(thetas), 4)
    np.testing.assert_allclose(logits[:, 0].numpy(), expected, atol=1e-4)
    np.testing.assert_allclose(logits[:, 1].numpy(), 2.0 * np.cos(np.array(thetas) - 2.0), atol=1e-4)


def test_sphereface_caffe_lambda_schedule_and_counter_in_state_dict() -> None:
    loss = build("sphereface", 3, 4, lambda_schedule="caffe")  # needs no begin_training
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    assert int(loss.iteration) == 0 and loss.current_lambda() == 1000.0
    for _ in range(3):
        loss(x, y)
    assert int(loss.iteration) == 3
    assert loss.current_lambda() == pytest.approx(1000.0 / (1 + 0.12 * 3))
    loss.eval()
    loss(x, y)
    loss.logits(x, y)
    assert int(loss.iteration) == 3  # evaluation does not advance the schedule
    state = loss.state_dict()
    assert int(state["iteration"]) == 3
    fresh = build("sphereface", 3, 4, lambda_schedule="caffe")
    fresh.load_state_dict(state)
    assert int(fresh.iteration) == 3 and fresh.current_lambda() == loss.current_lambda()
    fresh.iteration.fill_(10_000)
    assert fresh.current_lambda() == 5.0  # floor lambda_min
    custom = build("sphereface", 3, 4, lambda_base=100.0, lambda_gamma=0.5, lambda_power=2.0, lambda_min=1.0,
                   lambda_schedule="caffe")
    custom.iteration.fill_(4)
    assert custom.current_lambda() == pytest.approx(100.0 * 3.0**-2)


def test_sphereface_caffe_schedule_is_bit_identical_to_the_reference_formula() -> None:
    """The caffe option keeps the per-iteration schedule exactly (same float64 ops as before)."""
    loss = build("sphereface", 3, 4, lambda_schedule="caffe")
    loss.begin_training(200)  # the run length does not matter to it
    cos = torch.linspace(-1.0, 1.0, 41)
    for it, by_hand in [(0, 1000.0), (1, 1000 / 1.12), (10, 1000 / 2.2), (154, 1000 / 19.48), (1657, 1000 / 199.84),
                        (1659, 5.0), (50_000, 5.0)]:
        loss.iteration.fill_(it)
        assert loss.current_lambda() == pytest.approx(by_hand, rel=1e-12)
        old = (1000.0 * (1.0 + 0.12 * torch.tensor(float(it), dtype=torch.float64)) ** (-1.0)).clamp_min(5.0)
        old = old.to(cos.dtype)
        assert torch.equal(loss.target_logit(cos), (old * cos + losses.psi(cos, 4)) / (1.0 + old))


def test_sphereface_fraction_schedule_by_hand() -> None:
    """lambda_base * (1 + g*it)^(-power), g = ((base/min)^(1/power) - 1) / T, T = fraction * total_steps."""
    loss = build("sphereface", 3, 4)  # defaults: fraction 0.5, 1000 -> 5, power 1
    loss.begin_training(100)  # T = 50, g = 199 / 50 = 3.98
    for it, by_hand in [(0, 1000.0), (1, 1000 / 4.98), (10, 1000 / 40.8), (25, 1000 / 100.5), (49, 1000 / 196.02),
                        (50, 5.0), (51, 5.0), (100, 5.0)]:
        loss.iteration.fill_(it)
        assert loss.current_lambda() == pytest.approx(by_hand, rel=1e-12), it
    assert loss.state_summary() == {"lambda": 5.0}
    # power 2, fraction 0.25 of 40 steps: T = 10, g = (sqrt(1000/5) - 1) / 10
    other = build("sphereface", 3, 4, lambda_power=2.0, lambda_warmup_fraction=0.25)
    other.begin_training(40)
    g = (math.sqrt(200.0) - 1.0) / 10.0
    for it, by_hand in [(3, 1000 / (1 + 3 * g) ** 2), (9, 1000 / (1 + 9 * g) ** 2), (10, 5.0), (40, 5.0)]:
        other.iteration.fill_(it)
        assert other.current_lambda() == pytest.approx(by_hand, rel=1e-12), it
    # the whole run: lambda falls monotonically and is the floor from T = 7.5 (of 15) on
    third = build("sphereface", 3, 4, lambda_base=50.0, lambda_min=2.0)
    third.begin_training(15)
    seen = []
    for it in range(16):
        third.iteration.fill_(it)
        seen.append(third.current_lambda())
    assert seen[0] == 50.0 and all(a > b for a, b in zip(seen[:8], seen[1:8])) and set(seen[8:]) == {2.0}


def test_sphereface_short_run_ends_at_lambda_min_with_the_full_margin() -> None:
    steps = 20
    torch.manual_seed(0)
    x, y = blobs(n_classes=3, dim=4, per_class=8)
    ends = {}
    for schedule in ("fraction", "caffe"):
        loss = build("sphereface", 3, 4, lambda_schedule=schedule)
        loss.begin_training(steps)
        optimizer = torch.optim.SGD(loss.parameters(), lr=0.01)
        for _ in range(steps):
            value = loss(x, y)
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
        assert int(loss.iteration) == steps
        # target logit of an embedding at theta = 0.5 from its class weight, ||x|| = 1 (scale 1)
        with torch.no_grad():
            w = loss.weight[0] / loss.weight[0].norm()
            ortho = torch.randn(4)
            ortho -= (ortho @ w) * w
            ortho /= ortho.norm()
            emb = (math.cos(0.5) * w + math.sin(0.5) * ortho).unsqueeze(0)
        ends[schedule] = (loss.current_lambda(), float(loss.logits(emb, torch.tensor([0])).detach()[0, 0]))
    lam, target = ends["fraction"]
    assert lam == 5.0  # lambda_min, exactly, at the last step
    # by hand: psi(0.5) = cos(4 * 0.5) (first piece, k = 0); target = (5 cos 0.5 + cos 2) / 6
    floor_gap = math.cos(0.5) - (5 * math.cos(0.5) + math.cos(2.0)) / 6
    assert floor_gap == pytest.approx(0.2156, abs=1e-4)
    assert math.cos(0.5) - target == pytest.approx(floor_gap, abs=1e-5)
    lam, target = ends["caffe"]  # 1000 / (1 + 0.12 * 20) = 294: the margin is nearly off
    assert lam == pytest.approx(1000 / 3.4)
    assert math.cos(0.5) - target == pytest.approx((math.cos(0.5) - math.cos(2.0)) / (1 + 1000 / 3.4), abs=1e-5)
    assert math.cos(0.5) - target < 0.005


def test_sphereface_schedule_state_survives_a_checkpoint() -> None:
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    loss = build("sphereface", 3, 4)
    loss.begin_training(30)
    for _ in range(7):
        loss(x, y)
    state = loss.state_dict()
    assert int(state["iteration"]) == 7 and int(state["total_steps"]) == 30
    resumed = build("sphereface", 3, 4)  # no begin_training: the checkpoint carries the run length
    resumed.load_state_dict(state)
    assert resumed.current_lambda() == loss.current_lambda() == pytest.approx(1000 / (1 + 199 / 15 * 7))
    for _ in range(8):
        resumed(x, y)
        loss(x, y)
    assert int(resumed.iteration) == 15 and resumed.current_lambda() == loss.current_lambda() == 5.0


def test_sphereface_fraction_schedule_needs_the_run_length() -> None:
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    loss = build("sphereface", 3, 4)
    with pytest.raises(ValueError, match=r"begin_training\(total_steps\)"):
        loss(x, y)
    assert int(loss.iteration) == 0
    loss.eval()
    loss(x, y)  # evaluation needs no run length
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="total_steps"):
            loss.begin_training(bad)
    build("sphereface", 3, 4, lambda_schedule="caffe").train()(x, y)


def test_loss_hooks_default_to_no_ops() -> None:
    for name in losses.available():
        loss = build(name, 4, 3)
        loss.begin_training(10)
        assert loss.state_summary() == ({"lambda": 1000.0} if name == "sphereface" else {})


# ---------------------------------------------------------------- triplet / contrastive
def np_triplet(x: np.ndarray, y: np.ndarray, alpha: float, mining: str) -> tuple[float, dict]:
    z = x / np.linalg.norm(x, axis=1, keepdims=True)
    n = len(y)
    d = np.array([[np.sum((z[i] - z[j]) ** 2) for j in range(n)] for i in range(n)])
    terms, branches = [], {"outside": 0, "inside": 0}
    for a in range(n):
        pos = [p for p in range(n) if p != a and y[p] == y[a]]
        neg = [q for q in range(n) if y[q] != y[a]]
        if not pos or not neg:
            continue
        if mining == "batch_hard":
            terms.append(max(0.0, max(d[a, pos]) - min(d[a, neg]) + alpha))
            continue
        for p in pos:
            farther = [d[a, q] for q in neg if d[a, q] > d[a, p]]
            if farther:
                branches["outside"] += 1
                dn = min(farther)
            else:
                branches["inside"] += 1
                dn = max(d[a, neg])
            terms.append(max(0.0, d[a, p] - dn + alpha))
    return float(np.mean(terms)), branches


@pytest.mark.parametrize("mining", ["batch_hard", "semi_hard"])
@pytest.mark.parametrize("alpha", [0.5, 0.2])
def test_triplet_matches_brute_force(mining: str, alpha: float) -> None:
    g = torch.Generator().manual_seed(7)
    y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3])  # identity 3 has no positive
    x = torch.randn(10, 4, generator=g) * 3.0
    loss = build("triplet", 4, 4, margin=alpha, mining=mining)
    ref, branches = np_triplet(x.double().numpy(), y.numpy(), alpha, mining)
    assert float(loss(x, y).detach()) == pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert ref > 0
    if mining == "semi_hard":
        assert branches["outside"] > 0 and branches["inside"] > 0  # both rules exercised


def test_triplet_needs_positives_and_is_pk() -> None:
    loss = build("triplet", 3, 4)
    assert loss.needs_pk_batches and not loss.is_classifier
    with pytest.raises(ValueError, match="PKBatchSampler"):
        loss(torch.randn(3, 4), torch.tensor([0, 1, 2]))


def test_contrastive_by_hand() -> None:
    angles = np.array([0.0, 0.5, 0.8, 1.0])
    norms = np.array([3.0, 0.5, 1.0, 2.0])  # the loss normalises
    x = torch.tensor(np.stack([np.cos(angles), np.sin(angles)], 1) * norms[:, None], dtype=torch.float32)
    y = torch.tensor([0, 0, 1, 1])

    def chord(a: float, b: float) -> float:
        return 2 * math.sin(abs(a - b) / 2)

    pos = [chord(0.0, 0.5), chord(0.8, 1.0)]
    neg = [chord(0.0, 0.8), chord(0.0, 1.0), chord(0.5, 0.8), chord(0.5, 1.0)]
    for m in (1.0, 0.6):
        expected = np.mean([0.5 * d**2 for d in pos]) + np.mean([0.5 * max(0.0, m - d) ** 2 for d in neg])
        loss = build("contrastive", 2, 2, margin=m)
        assert float(loss(x, y).detach()) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="positive"):
        loss(x, torch.tensor([0, 1, 2, 3]))


def test_pair_losses_finite_gradient_for_identical_embeddings() -> None:
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    y = torch.tensor([0, 0, 1, 1])
    for name, params in [("contrastive", {}), ("triplet", {}), ("triplet", {"mining": "semi_hard"})]:
        x.grad = None
        build(name, 2, 2, **params)(x, y).backward()
        assert torch.isfinite(x.grad).all(), name


# ---------------------------------------------------------------- center loss
def test_center_loss_value_and_update_rule_two_steps() -> None:
    loss = build("center", num_classes=3, embedding_size=2, center_weight=0.1, center_lr=0.5)
    with torch.no_grad():
        loss.weight.zero_()
        loss.bias.zero_()  # CE = log 3 for every sample
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]], requires_grad=True)
    y = torch.tensor([0, 0, 1])
    # step 1: centres start at 0
    assert float(loss(x, y).detach()) == pytest.approx(math.log(3) + 0.1 * 0.5 * (1 + 9 + 4) / 3, rel=1e-6)
    # c0 -= 0.5 * ((0-1) + (0-3)) / (1+2) -> 2/3 ; c1 -= 0.5 * (0-2)/(1+1) -> 0.5 ; c2 untouched
    torch.testing.assert_close(loss.centers, torch.tensor([[2 / 3, 0.0], [0.0, 0.5], [0.0, 0.0]]))
    # step 2 uses the updated centres
    dist2 = (1 - 2 / 3) ** 2 + (3 - 2 / 3) ** 2 + (2 - 0.5) ** 2
    assert float(loss(x, y).detach()) == pytest.approx(math.log(3) + 0.1 * 0.5 * dist2 / 3, rel=1e-6)
    # c0 -= 0.5 * ((2/3-1) + (2/3-3)) / 3 -> 10/9 ; c1 -= 0.5 * (0.5-2)/2 -> 0.875
    torch.testing.assert_close(loss.centers, torch.tensor([[10 / 9, 0.0], [0.0, 0.875], [0.0, 0.0]]))
    assert "centers" in loss.state_dict()
    assert all(p is not loss.centers for p in loss.parameters())
    loss.eval()
    loss(x, y)
    torch.testing.assert_close(loss.centers, torch.tensor([[10 / 9, 0.0], [0.0, 0.875], [0.0, 0.0]]))


def test_center_loss_gradient_reaches_embeddings_not_centres() -> None:
    loss = build("center", 3, 2, center_weight=1.0)
    x = torch.randn(4, 2, requires_grad=True)
    loss(x, torch.tensor([0, 1, 2, 0])).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert not loss.centers.requires_grad


def test_softmax_logits_are_affine() -> None:
    loss = build("softmax", 4, 3)
    x = torch.randn(5, 3)
    assert tuple(loss.bias.shape) == (4,)
    torch.testing.assert_close(loss.logits(x, torch.zeros(5, dtype=torch.int64)), x @ loss.weight.T + loss.bias)
    y = torch.tensor([0, 1, 2, 3, 0])
    ref = np_ce((x @ loss.weight.T + loss.bias).detach().double().numpy(), y.numpy())
    assert float(loss(x, y).detach()) == pytest.approx(ref, rel=1e-5)


# ------------------------------------------------ training-time L2 normalisation switches
def test_softmax_normalized_known_angles_by_hand() -> None:
    """normalize: true -> logits s*cos(theta_j), whatever the lengths of x and W_j, no bias."""
    thetas = [0.3, 1.2, 2.9]
    for radius in (0.5, 3.0):  # the feature norm must not matter
        logits = known_angle_logits("softmax", thetas, radius=radius, normalize=True, scale=16.0)
        for i, t in enumerate(thetas):
            for j, a in enumerate([0.0, 2.0, 4.0]):  # class weights at these angles, length 5
                assert float(logits[i, j]) == pytest.approx(16.0 * math.cos(t - a), abs=1e-4)
    loss = build("softmax", 3, 2, normalize=True, scale=16.0)
    assert loss.bias is None and "bias" not in loss.state_dict()
    angles = torch.tensor([0.0, 2.0, 4.0])
    with torch.no_grad():
        loss.weight.copy_(torch.stack([angles.cos(), angles.sin()], dim=1) * 5.0)
    x = torch.tensor([[3.0 * math.cos(1.2), 3.0 * math.sin(1.2)]])
    # cross-entropy of class 0 by hand: log(sum_j exp(16 cos(1.2 - a_j))) - 16 cos(1.2)
    z = [16.0 * math.cos(1.2 - a) for a in (0.0, 2.0, 4.0)]
    by_hand = math.log(sum(math.exp(v) for v in z)) - z[0]
    assert float(loss(x, torch.tensor([0])).detach()) == pytest.approx(by_hand, rel=1e-5)


def test_softmax_normalized_at_default_scale_equals_normface() -> None:
    torch.manual_seed(0)
    soft = build("softmax", 5, 8, normalize=True)
    norm = build("normface", 5, 8)
    with torch.no_grad():
        norm.weight.copy_(soft.weight)
    x, y = batch(loss=norm)
    torch.testing.assert_close(soft.logits(x), norm.logits(x, y))
    torch.testing.assert_close(soft(x, y), norm(x, y))


def test_plain_softmax_keeps_its_bias_and_affine_logits() -> None:
    """normalize: false (default) keeps x W^T + b with the bias, as before the switch existed."""
    torch.manual_seed(3)
    loss = build("softmax", 4, 3)
    x = torch.randn(5, 3) * 4.0
    torch.testing.assert_close(loss.logits(x), x @ loss.weight.T + loss.bias)
    assert loss.hparams == {"normalize": False, "scale": 64.0}


def test_sphereface_normalized_features_known_angles_by_hand() -> None:
    """normalize_features: true -> s*psi(theta) for the target and s*cos(theta_j) for the others
    (lambda = 0), independent of ||x||; off, the same logits are scaled by ||x||."""
    thetas = [0.3, 1.0, 2.0, 3.0]

    def psi_by_hand(t: float, m: int = 4) -> float:
        k = min(int(m * t / PI), m - 1)
        return (-1) ** k * math.cos(m * t) - 2 * k

    for radius in (0.5, 2.0):
        logits = known_angle_logits("sphereface", thetas, radius=radius, lambda_base=0.0, lambda_min=0.0,
                                    normalize_features=True, scale=30.0)
        for i, t in enumerate(thetas):
            assert float(logits[i, 0]) == pytest.approx(30.0 * psi_by_hand(t), abs=1e-4)
            assert float(logits[i, 1]) == pytest.approx(30.0 * math.cos(t - 2.0), abs=1e-4)
    raw = known_angle_logits("sphereface", thetas, radius=2.0, lambda_base=0.0, lambda_min=0.0)
    assert float(raw[1, 0]) == pytest.approx(2.0 * psi_by_hand(1.0), abs=1e-4)  # ||x|| = 2 scales it
    # with lambda: (lambda cos + psi) / (1 + lambda), still scaled by s
    lam = build("sphereface", 3, 2, lambda_base=5.0, lambda_min=5.0, normalize_features=True, scale=30.0)
    with torch.no_grad():
        lam.weight.copy_(torch.tensor([[1.0, 0.0], [math.cos(2.0), math.sin(2.0)], [math.cos(4.0), math.sin(4.0)]]))
    x = torch.tensor([[7.0 * math.cos(1.0), 7.0 * math.sin(1.0)]])
    got = float(lam.logits(x, torch.tensor([0]))[0, 0].detach())
    assert got == pytest.approx(30.0 * (5.0 * math.cos(1.0) + psi_by_hand(1.0)) / 6.0, abs=1e-4)


def test_class_scores_and_centres_of_the_trained_head() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 8)
    for name, params in (("softmax", {}), ("softmax", {"normalize": True}), ("center", {}), ("arcface", {}),
                         ("sphereface", {}), ("cosface", {})):
        loss = build(name, 5, 8, **params)
        scores = loss.class_scores(x)
        assert scores.shape == (6, 5)
        if name in ("softmax", "center"):  # the logits, bias included
            torch.testing.assert_close(scores, loss.logits(x))
        else:  # the cosines, no margin
            torch.testing.assert_close(scores, torch.nn.functional.normalize(x) @ torch.nn.functional.normalize(
                loss.weight).T)
        assert torch.equal(loss.class_centres(), loss.weight.detach().float())
    sub = build("subcenter", 5, 8)
    assert sub.class_scores(x).shape == (6, 5) and sub.class_centres() is None
    for name in ("triplet", "contrastive"):
        assert build(name, 5, 8).class_scores(x) is None and build(name, 5, 8).class_centres() is None


# ---------------------------------------------------------------- scale: auto (AdaCos' fixed scale)
# sqrt(2) * ln(C - 1) by hand: 1.41421356 * ln 2 = 0.98025814, * ln 4 = 1.96051629, * ln 79 = 6.17933241
AUTO_SCALE_BY_HAND = {3: 0.98025814, 5: 1.96051629, 80: 6.17933241, 10001: 13.02538827}

AUTO_CASES = [
    ("normface", {}),
    ("cosface", {}),
    ("arcface", {}),
    ("combined", {"m1": 1.0, "m2": 0.3, "m3": 0.2}),
    ("subcenter", {}),
    ("intra", {}),
    ("inter", {}),
]


def test_auto_scale_by_hand() -> None:
    for classes, value in AUTO_SCALE_BY_HAND.items():
        assert losses.auto_scale(classes) == pytest.approx(value, abs=1e-7)
        assert build("arcface", classes, 4, scale="auto").scale == pytest.approx(value, abs=1e-7)


@pytest.mark.parametrize(("name", "params"), AUTO_CASES)
def test_auto_scale_logits_and_loss_match_numpy(name: str, params: dict) -> None:
    """scale: auto gives the logits of the formula with s = sqrt(2) ln(5 - 1) for 5 classes."""
    torch.manual_seed(2)
    loss = build(name, num_classes=5, embedding_size=8, scale="auto", **params)
    assert loss.hparams["scale"] == "auto"
    x, y = batch(loss=loss)
    p = {**losses.validate_params(name, params), "scale": AUTO_SCALE_BY_HAND[5]}
    w = loss.weight.detach().double().numpy()
    ref_logits = np_logits(name, x.double().numpy(), w, y.numpy(), p)
    np.testing.assert_allclose(loss.logits(x, y).detach().double().numpy(), ref_logits, rtol=1e-5, atol=1e-5)
    ref_loss = np_ce(ref_logits, y.numpy()) + np_regularizer(name, x.double().numpy(), w, y.numpy())
    assert float(loss(x, y).detach()) == pytest.approx(ref_loss, rel=1e-5, abs=1e-5)
    assert loss.state_summary() == {"scale": pytest.approx(AUTO_SCALE_BY_HAND[5])}
    assert build(name, 5, 8, **params).state_summary() == {}  # a numeric scale needs no summary


def test_auto_scale_of_softmax_and_sphereface_normalisation_switches_by_hand() -> None:
    s = AUTO_SCALE_BY_HAND[3]  # known_angle_logits: 3 classes at 0, 2 and 4 rad
    soft = known_angle_logits("softmax", THETAS, radius=3.0, normalize=True, scale="auto")
    for i, t in enumerate(THETAS):
        for j, a in enumerate([0.0, 2.0, 4.0]):
            assert float(soft[i, j]) == pytest.approx(s * math.cos(t - a), abs=1e-5)
    # SphereFace with lambda = 0 and features normalised: s * psi(theta) = s * cos(4 theta) for theta < pi/4
    sphere = known_angle_logits("sphereface", [0.3], radius=2.0, lambda_base=0.0, lambda_min=0.0,
                                normalize_features=True, scale="auto")
    assert float(sphere[0, 0]) == pytest.approx(s * math.cos(1.2), abs=1e-5)
    assert float(sphere[0, 1]) == pytest.approx(s * math.cos(0.3 - 2.0), abs=1e-5)
    assert build("softmax", 3, 2, normalize=True, scale="auto").state_summary() == {"scale": pytest.approx(s)}


@pytest.mark.parametrize(
    ("name", "params", "needle"),
    [
        ("arcface", {"scale": "big"}, "expected a number in (0, inf) or 'auto'"),
        ("cosface", {"scale": "Auto"}, "'scale' = 'Auto'"),
        ("softmax", {"scale": "auto"}, "needs normalize: true"),
        ("sphereface", {"scale": "auto"}, "needs normalize_features: true"),
    ],
)
def test_auto_scale_bad_values_name_the_param(name: str, params: dict, needle: str) -> None:
    for attempt in (lambda: losses.validate_params(name, params), lambda: build(name, 5, 8, **params)):
        with pytest.raises(ValueError) as err:
            attempt()
        assert "\n" not in str(err.value) and str(err.value).startswith(f"{name}: ") and needle in str(err.value)


def test_auto_scale_needs_three_classes() -> None:
    losses.validate_params("arcface", {"scale": "auto"})  # the class count is only known when built
    for name, params in (("arcface", {}), ("softmax", {"normalize": True})):
        with pytest.raises(ValueError) as err:
            build(name, 2, 8, scale="auto", **params)
        message = str(err.value)
        assert "\n" not in message and message.startswith(f"{name}: scale: auto needs at least 3 classes")


# ---------------------------------------------------------------- margin warm-up
def warm_loss(name: str, iteration: int, total_steps: int = 100, **params) -> losses.LossBase:
    """Loss ``name`` with the 2-D known-angle weights, told ``total_steps`` and trained ``iteration`` steps
    (training-mode forwards on a dummy batch, so the counter is advanced the way the trainer does it)."""
    loss = build(name, num_classes=3, embedding_size=2, **params)
    loss.begin_training(total_steps)
    angles = torch.tensor([0.0, 2.0, 4.0])
    with torch.no_grad():
        loss.weight.copy_(torch.stack([angles.cos(), angles.sin()], dim=1) * 5.0)
    loss.train()
    for _ in range(iteration):
        loss(torch.tensor([[1.0, 0.3]]), torch.tensor([0]))
    return loss


def target_logits(loss: losses.LossBase, thetas: list[float]) -> list[float]:
    t = torch.tensor(thetas, dtype=torch.float64)
    x = torch.stack([t.cos(), t.sin()], dim=1).float()
    return loss.logits(x, torch.zeros(len(thetas), dtype=torch.int64))[:, 0].detach().double().tolist()


def test_cosface_margin_warmup_by_hand() -> None:
    """margin_warmup 0.2 of 100 steps: the margin is 0.35 * t / 20 at step t, then 0.35."""
    for steps, margin in ((0, 0.0), (1, 0.35 / 20), (5, 0.0875), (19, 0.3325), (20, 0.35), (37, 0.35)):
        loss = warm_loss("cosface", steps, margin_warmup=0.2)
        assert int(loss.iteration) == steps
        expected = [64.0 * (math.cos(t) - margin) for t in THETAS]
        assert target_logits(loss, THETAS) == pytest.approx(expected, abs=1e-4)


def test_arcface_margin_warmup_by_hand_including_the_fallback() -> None:
    """Half-way through a 0.5-warm-up of 40 steps (t = 10 of 20) the margin is 0.25: s*cos(theta + 0.25),
    and past theta = pi - 0.25 = 2.8916 the fallback of that margin, s*(cos(theta) - 0.25*sin(0.25))."""
    loss = warm_loss("arcface", 10, total_steps=40, margin_warmup=0.5)
    expected = [64 * math.cos(0.55), 64 * math.cos(1.45), 64 * (math.cos(2.9) - 0.25 * math.sin(0.25))]
    assert target_logits(loss, THETAS) == pytest.approx(expected, abs=1e-4)
    assert loss.state_summary() == {"margin_fraction": 0.5}
    # at the full margin pi - 0.5 = 2.6416 < 2.9: the known-angle values of the default ArcFace
    full = warm_loss("arcface", 20, total_steps=40, margin_warmup=0.5)
    assert target_logits(full, THETAS) == pytest.approx([44.589229398, -8.246047635, -77.482939805], abs=1e-4)
    easy = warm_loss("arcface", 10, total_steps=40, margin_warmup=0.5, easy_margin=True)
    assert target_logits(easy, THETAS) == pytest.approx([64 * math.cos(0.55), 64 * math.cos(1.45),
                                                         64 * math.cos(2.9)], abs=1e-4)


def test_combined_margin_warmup_by_hand() -> None:
    """(m1, m2, m3) move linearly from (1, 0, 0): half-way (1.35, 0.1, 0.05) is (1.175, 0.05, 0.025), whose
    fallback starts at theta* = (pi - 0.05)/1.175 = 2.63114 with penalty (pi - theta*)*sin(theta*)."""
    loss = warm_loss("combined", 10, total_steps=20, margin_warmup=1.0, m1=1.35, m2=0.1, m3=0.05)
    theta_star = (PI - 0.05) / 1.175
    penalty = (PI - theta_star) * math.sin(theta_star)
    expected = [64 * (math.cos(1.175 * 0.3 + 0.05) - 0.025), 64 * (math.cos(1.175 * 1.2 + 0.05) - 0.025),
                64 * (math.cos(2.9) - penalty - 0.025)]
    assert target_logits(loss, THETAS) == pytest.approx(expected, abs=1e-4)
    cm2 = warm_loss("combined", 5, total_steps=20, margin_warmup=0.5, m1=0.9, m2=0.4, m3=0.15)  # f = 0.5
    assert target_logits(cm2, [1.2]) == pytest.approx([64 * (math.cos(0.95 * 1.2 + 0.2) - 0.075)], abs=1e-4)


@pytest.mark.parametrize(("name", "params"), [("cosface", {}), ("arcface", {}), ("arcface", {"margin": 0.8}),
                                              ("combined", {"m1": 0.9, "m2": 0.4, "m3": 0.15}),
                                              ("subcenter", {})])
def test_margin_warmup_starts_at_normface_and_ends_at_the_full_loss(name: str, params: dict) -> None:
    torch.manual_seed(4)
    warm = build(name, 5, 8, margin_warmup=0.3, **params)
    plain, normface = build(name, 5, 8, **params), build("normface", 5, 8)
    with torch.no_grad():
        plain.weight.copy_(warm.weight)
        if name != "subcenter":
            normface.weight.copy_(warm.weight)
    x, y = batch(loss=warm, seed=6)
    if name != "subcenter":  # no margin before the first step
        torch.testing.assert_close(warm.logits(x, y), normface.logits(x, y))
    warm.begin_training(50)  # warm-up over 15 steps
    warm.train()
    for _ in range(15):
        warm(x, y)
    torch.testing.assert_close(warm.logits(x, y), plain.logits(x, y), atol=1e-4, rtol=1e-5)
    warm.eval()
    torch.testing.assert_close(warm(x, y), plain(x, y), atol=1e-4, rtol=1e-5)
    assert int(warm.iteration) == 15  # eval forwards do not count


def test_margin_warmup_survives_a_checkpoint_and_old_state_dicts_still_load() -> None:
    loss = warm_loss("arcface", 6, total_steps=40, margin_warmup=0.5)  # f = 6/20
    resumed = build("arcface", 3, 2, margin_warmup=0.5)  # no begin_training: the checkpoint carries the run length
    resumed.load_state_dict(loss.state_dict())
    assert int(resumed.iteration) == 6 and int(resumed.total_steps) == 40
    assert target_logits(resumed, [1.2]) == pytest.approx([64 * math.cos(1.2 + 0.15)], abs=1e-4)
    resumed.train()
    resumed(torch.tensor([[1.0, 0.3]]), torch.tensor([0]))
    assert target_logits(resumed, [1.2]) == pytest.approx([64 * math.cos(1.2 + 0.175)], abs=1e-4)
    # without a warm-up the state_dict is the weight alone, as before margin_warmup existed
    assert set(build("arcface", 3, 2).state_dict()) == {"weight"}
    assert set(loss.state_dict()) == {"weight", "iteration", "total_steps"}


def test_margin_warmup_needs_the_run_length() -> None:
    loss = build("cosface", 3, 4, margin_warmup=0.1)
    x, y = torch.randn(2, 4), torch.tensor([0, 1])
    with pytest.raises(ValueError) as err:
        loss.train()(x, y)
    assert str(err.value).startswith("cosface: margin_warmup = 0.1 needs the number of training steps")
    assert int(loss.iteration) == 0
    with pytest.raises(ValueError, match="total_steps = 0"):
        loss.begin_training(0)
    build("cosface", 3, 4).train()(x, y)  # no warm-up: no run length needed


@pytest.mark.parametrize(
    ("name", "params", "needle"),
    [
        ("arcface", {"margin_warmup": -0.1}, "'margin_warmup' = -0.1 is not allowed; expected a number in [0, 1]"),
        ("cosface", {"margin_warmup": 1.5}, "'margin_warmup' = 1.5"),
        ("subcenter", {"margin_warmup": "0.2"}, "'margin_warmup' = '0.2'"),
        ("normface", {"margin_warmup": 0.2}, "unknown param 'margin_warmup'"),
        ("combined", {"m1": 0.95, "m2": 0.1, "m3": 0.2, "margin_warmup": 0.2}, "margin_warmup = 0.2 needs m1 >= 1"),
    ],
)
def test_margin_warmup_bad_values_name_the_param(name: str, params: dict, needle: str) -> None:
    for attempt in (lambda: losses.validate_params(name, params), lambda: build(name, 5, 8, **params)):
        with pytest.raises(ValueError) as err:
            attempt()
        assert "\n" not in str(err.value) and str(err.value).startswith(f"{name}: ") and needle in str(err.value)
    if name == "combined":  # the same margins without a warm-up are allowed
        losses.validate_params(name, {**params, "margin_warmup": 0.0})


# ---------------------------------------------------------------- registry and validation
def test_registry_api() -> None:
    names = losses.available()
    for required in ("softmax", "normface", "sphereface", "cosface", "arcface", "combined", "subcenter",
                     "triplet", "contrastive", "center"):
        assert required in names and losses.REGISTRY[required].name == required
    assert {n for n in names if losses.REGISTRY[n].needs_pk_batches} == {"triplet", "contrastive"}
    assert {n for n in names if not losses.REGISTRY[n].is_classifier} == {"triplet", "contrastive"}
    assert losses.defaults("arcface") == {"scale": 64.0, "margin": 0.5, "easy_margin": False, "margin_warmup": 0.0}
    assert losses.defaults("cosface") == {"scale": 64.0, "margin": 0.35, "margin_warmup": 0.0}
    assert losses.defaults("combined") == {"scale": 64.0, "m1": 1.0, "m2": 0.3, "m3": 0.2, "margin_warmup": 0.0}
    assert losses.defaults("sphereface") == {
        "margin": 4, "lambda_base": 1000.0, "lambda_gamma": 0.12, "lambda_power": 1.0, "lambda_min": 5.0,
        "lambda_schedule": "fraction", "lambda_warmup_fraction": 0.5, "normalize_features": False, "scale": 64.0,
    }
    assert losses.defaults("softmax") == {"normalize": False, "scale": 64.0}
    assert losses.defaults("triplet") == {"margin": 0.5, "mining": "batch_hard"}
    assert losses.defaults("contrastive") == {"margin": 1.0}
    assert losses.defaults("center") == {"center_weight": 0.003, "center_lr": 0.5, "start": 0.0}
    assert losses.defaults("subcenter")["subcenters"] == 3
    assert losses.validate_params("arcface", {"margin": 0.8}) == {"scale": 64.0, "margin": 0.8, "easy_margin": False,
                                                                  "margin_warmup": 0.0}
    assert losses.validate_params("sphereface", {"margin": 3.0})["margin"] == 3
    for name in names:
        module = build(name, 7, 5)
        if module.is_classifier:
            rows = 7 * module.hparams.get("subcenters", 1)
            assert tuple(module.weight.shape) == (rows, 5)
            assert module.logits(torch.randn(2, 5), torch.tensor([0, 6])).shape == (2, 7)


@pytest.mark.parametrize(
    ("name", "params", "needle"),
    [
        ("arcface", {"scale": 0.0}, "scale"),
        ("normface", {"scale": -1.0}, "scale"),
        ("arcface", {"margin": -0.1}, "margin"),
        ("arcface", {"margin": 3.2}, "margin"),
        ("arcface", {"margin": "0.5"}, "margin"),
        ("arcface", {"easy_margin": 1}, "easy_margin"),
        ("cosface", {"margin": -0.35}, "margin"),
        ("cosface", {"margin": float("nan")}, "margin"),
        ("sphereface", {"margin": 2.5}, "margin"),
        ("sphereface", {"margin": 0}, "margin"),
        ("sphereface", {"lambda_min": -1.0}, "lambda_min"),
        ("sphereface", {"lambda_schedule": "linear"}, "lambda_schedule"),
        ("sphereface", {"lambda_warmup_fraction": 0.0}, "lambda_warmup_fraction"),
        ("sphereface", {"lambda_warmup_fraction": 1.5}, "lambda_warmup_fraction"),
        ("sphereface", {"lambda_min": 0.0}, "lambda_min"),  # fraction: a power law never reaches 0
        ("sphereface", {"lambda_power": 0.0}, "lambda_power"),  # fraction: never decays
        ("combined", {"m1": 0.0}, "m1"),
        ("combined", {"m1": -1.0}, "m1"),
        ("combined", {"m2": -0.1}, "m2"),
        ("combined", {"m3": -0.2}, "m3"),
        ("combined", {"m1": 4.0, "m2": 0.0, "m3": 0.0}, "m1"),  # fallback would not be monotone
        ("combined", {"m1": 0.5, "m2": 0.0, "m3": 0.0}, "m1"),  # negative margin
        ("combined", {"m1": 0.9, "m2": 0.2, "m3": 0.0}, "m2"),  # negative margin past theta = 2
        ("subcenter", {"subcenters": 0}, "subcenters"),
        ("triplet", {"mining": "hardest"}, "mining"),
        ("triplet", {"margin": -0.5}, "margin"),
        ("contrastive", {"margin": 0.0}, "margin"),
        ("center", {"center_lr": 1.5}, "center_lr"),
        ("center", {"center_weight": -0.003}, "center_weight"),
        ("arcface", {"margn": 0.5}, "margn"),
        ("normface", {"margin": 0.5}, "margin"),
        ("softmax", {"scale": 30.0}, "scale"),  # scale needs normalize: true
        ("softmax", {"normalize": "yes"}, "normalize"),
        ("sphereface", {"scale": 30.0}, "normalize_features"),  # scale needs normalize_features: true
        ("sphereface", {"normalize_features": 1}, "normalize_features"),
    ],
)
def test_invalid_params_raise_value_error_naming_the_param(name: str, params: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle) as err:
        build(name, 5, 8, **params)
    assert name in str(err.value)
    with pytest.raises(ValueError, match=needle):
        losses.validate_params(name, params)


def test_unknown_loss_and_bad_sizes() -> None:
    with pytest.raises(ValueError, match="known losses: .*arcface"):
        build("arcfce", 5, 8)
    with pytest.raises(ValueError, match="num_classes"):
        build("arcface", 1, 8)
    with pytest.raises(ValueError, match="embedding_size"):
        build("arcface", 5, 0)


def test_bad_inputs_raise_clear_errors() -> None:
    loss = build("arcface", 5, 8)
    with pytest.raises(ValueError, match=r"\[B, 8\]"):
        loss(torch.randn(4, 7), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="int64"):
        loss(torch.randn(4, 8), torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="label 5"):
        loss(torch.randn(2, 8), torch.tensor([0, 5]))


def test_check_finite_message() -> None:
    check_finite(torch.tensor(1.5), loss_name="arcface", step=3, params={})
    with pytest.raises(NonFiniteLossError) as err:
        check_finite(torch.tensor(float("nan")), loss_name="arcface", step=120, params={"margin": 1.4, "scale": 64.0})
    message = str(err.value)
    assert message.startswith("arcface loss became nan at step 120")
    assert "margin=1.4" in message and "lower loss.margin or the learning rate" in message
    assert err.value.step == 120 and err.value.loss_name == "arcface"
    with pytest.raises(NonFiniteLossError, match="sphereface loss became inf at step 7.*lambda_min=5"):
        check_finite(float("inf"), loss_name="sphereface", step=7, params=losses.defaults("sphereface"))
    with pytest.raises(NonFiniteLossError, match="losses.subcenter.margin"):
        check_finite(float("nan"), loss_name="subcenter", step=1, params={"margin": 0.5})
    with pytest.raises(NonFiniteLossError, match="triplet loss became -inf at step 0"):
        check_finite(float("-inf"), loss_name="triplet", step=0)


# ---------------------------------------------------------------- training smoke tests
SMOKE = {
    "softmax": {},
    "normface": {"scale": 16.0},
    "sphereface": {},
    "cosface": {"scale": 16.0},
    "arcface": {"scale": 16.0},
    "combined": {"scale": 16.0},
    "subcenter": {"scale": 16.0},
    "triplet": {},
    "contrastive": {},
    "center": {"center_weight": 0.01},
    "intra": {"scale": 16.0},
    "inter": {"scale": 16.0},
}


def blobs(n_classes: int = 10, dim: int = 32, per_class: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(n_classes, dim, generator=g)
    y = torch.arange(n_classes).repeat_interleave(per_class)
    return centres[y] + 0.5 * torch.randn(len(y), dim, generator=g), y


@pytest.mark.parametrize("name", list(SMOKE))
def test_training_lowers_the_loss(name: str) -> None:
    torch.manual_seed(0)
    x, y = blobs()
    net = nn.Linear(32, 16)
    loss = build(name, num_classes=10, embedding_size=16, **SMOKE[name])
    opt = torch.optim.SGD([*net.parameters(), *loss.parameters()], lr=0.05, momentum=0.9)

    def full_loss() -> float:
        loss.eval()
        with torch.no_grad():
            value = float(loss(net(x), y))
        loss.train()
        return value

    if loss.needs_pk_batches:
        sampler = PKBatchSampler(y.tolist(), p=5, k=4, seed=0, batches_per_epoch=40)
        batches = [torch.tensor(b) for b in sampler]
    else:
        g = torch.Generator().manual_seed(1)
        batches = [torch.randperm(len(y), generator=g)[:40] for _ in range(40)]
    loss.begin_training(len(batches))
    before = full_loss()
    for step, idx in enumerate(batches):
        value = loss(net(x[idx]), y[idx])
        check_finite(value, loss_name=name, step=step)
        opt.zero_grad()
        value.backward()
        opt.step()
    after = full_loss()
    print(f"{name}: {before:.4f} -> {after:.4f} ({after / before:.3f})")
    assert after < 0.5 * before, (before, after)


# ------------------------------------------------------------ no reads back from a GPU
TRACED = [("softmax", {}), ("softmax", {"normalize": True}), ("normface", {}), ("sphereface", {}),
          ("sphereface", {"normalize_features": True}), ("cosface", {}), ("arcface", {}), ("combined", {}),
          ("subcenter", {}), ("intra", {}), ("inter", {}), ("center", {}), ("triplet", {"mining": "batch_hard"}),
          ("triplet", {"mining": "semi_hard"}), ("contrastive", {}),
          ("cosface", {"margin_warmup": 0.2}), ("arcface", {"margin_warmup": 0.2, "scale": "auto"}),
          ("combined", {"margin_warmup": 0.5}), ("subcenter", {"margin_warmup": 0.2})]


@pytest.mark.parametrize("name, params", TRACED)
def test_training_forward_without_value_checks_never_reads_the_device(name, params):
    """With ``check_values`` off (the trainer checks the labels once on the host), a training
    forward has no data-dependent host read: torch.compile(fullgraph=True) traces it as one
    graph, which it refuses for ``int(t)``, ``bool(t)`` or boolean indexing. With the checks
    on it refuses, which shows the trace would catch such a read."""
    torch.manual_seed(0)
    x = torch.randn(8, 16)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    for check in (False, True):
        loss = build(name, num_classes=4, embedding_size=16, **params)
        loss.begin_training(100)
        loss.check_values = check
        eager = build(name, num_classes=4, embedding_size=16, **params)
        eager.load_state_dict(loss.state_dict())
        eager.begin_training(100)
        torch._dynamo.reset()
        traced = torch.compile(loss, backend="eager", fullgraph=True)
        if check:
            with pytest.raises(Exception, match="data-dependent"):
                traced(x, y)
        else:
            torch.testing.assert_close(traced(x, y), eager(x, y))


def test_masked_mean_is_the_mean_of_the_selection():
    from pipeline.losses.pairs import masked_mean

    g = torch.Generator().manual_seed(0)
    values = torch.rand(64, generator=g)
    assert torch.equal(masked_mean(values, torch.ones(64, dtype=torch.bool)), values.mean())  # same bits
    mask = torch.rand(64, generator=g) < 0.3
    torch.testing.assert_close(masked_mean(values, mask), values[mask].mean())
    inf_outside = values.masked_fill(~mask, float("inf"))  # masked-out entries may be anything
    torch.testing.assert_close(masked_mean(inf_outside, mask), values[mask].mean())
    assert torch.isnan(masked_mean(values, torch.zeros(64, dtype=torch.bool)))


def test_pair_losses_without_an_anchor_raise_with_checks_and_give_nan_without():
    x = torch.randn(4, 8)
    y = torch.tensor([0, 1, 2, 3])  # no positive pair
    for name, params in (("triplet", {"mining": "batch_hard"}), ("triplet", {"mining": "semi_hard"}),
                         ("contrastive", {})):
        loss = build(name, num_classes=4, embedding_size=8, **params)
        with pytest.raises(ValueError, match="PKBatchSampler"):
            loss(x, y)
        loss.check_values = False
        assert torch.isnan(loss(x, y))  # the trainer's NaN check stops such a run


def test_center_counts_without_bincount_match_bincount():
    loss = build("center", num_classes=5, embedding_size=3, center_lr=0.5)
    x = torch.randn(7, 3)
    y = torch.tensor([0, 4, 4, 2, 0, 0, 1])
    loss.update_centers(x, y)
    counts = torch.bincount(y, minlength=5).float()
    sums = torch.zeros(5, 3).index_add_(0, y, -x)  # centres start at zero
    torch.testing.assert_close(loss.centers, -0.5 * sums / (1.0 + counts).unsqueeze(1), rtol=0, atol=0)


def test_center_loss_switched_on_late_adds_its_term_only_after_start():
    """start = 0.5 of 6 steps: steps 1-3 are plain softmax (same loss as center_weight 0), steps 4-6 add
    lambda * 1/2 * mean ||x - c_y||^2 on the centres as they are then; the centres move from the first
    step, exactly as with start = 0."""
    torch.manual_seed(0)
    x = torch.randn(6, 8, 4)  # 6 steps of 8 embeddings
    y = torch.randint(0, 3, (6, 8))
    late = losses.build("center", 3, 4, center_weight=0.5, start=0.5)
    early = losses.build("center", 3, 4, center_weight=0.5)
    plain = losses.build("center", 3, 4, center_weight=0.0)
    for module in (early, plain):
        module.load_state_dict({k: v for k, v in late.state_dict().items() if k in module.state_dict()})
    for module in (late, early, plain):
        module.begin_training(6)
        module.train()
    for step in range(6):
        centres = late.centers.clone()
        with torch.no_grad():
            got, on, off = late(x[step], y[step]), early(x[step], y[step]), plain(x[step], y[step])
        term = 0.5 * (x[step] - centres[y[step]]).pow(2).sum(dim=1).mean()
        if step < 3:
            assert torch.allclose(got, off)
        else:
            assert torch.allclose(got, off + 0.5 * term) and torch.allclose(got, on)
        assert torch.allclose(late.centers, early.centers)  # updated from the first step either way
    assert late.state_summary() == {"center_on": 1.0}
    with pytest.raises(ValueError, match="center: start = 0.5 needs the number of training steps"):
        losses.build("center", 3, 4, start=0.5).train()(x[0], y[0])
