"""Built-in synthetic face dataset, generated deterministically from a seed.

Each face is painted in a *canonical* frontal frame (face units, 1 unit ~ 10 cm; x grows
to the image right, i.e. the subject's left; y grows down; the eyes lie on y = 0, centred
on x = 0) as premultiplied RGBA albedo plus a height field ``z`` towards the camera. The
height field gives per-pixel normals for wrapped-Lambert + Blinn-Phong shading, and head
pose (yaw, pitch; radians) is rendered by inverting the orthographic projection of the
height field with a few Newton steps per output pixel. In-plane rotation (roll), scale and
position are a similarity on top.

Per identity: face geometry, skin tone, hair colour/style, iris colour, facial hair, moles.
Per image: pose, scale/position, light direction/intensity/colour, exposure/gamma,
expression, gaze, hair volume/hairline/tint, glasses, clothes, background, blur, sensor
noise, JPEG quality. Domain "b" draws darker skin tones and harsher, colder light.

Every identity and image has its own ``numpy.random.default_rng`` seeded from (seed, set
or group name, identity index, image index), so output bytes do not depend on the number
of workers, and changing one count does not change the other images.

Public API: :func:`generate_synthetic` (writes the four sets and their pairs),
:func:`render_face`, :func:`face_landmarks`, :func:`sample_identity`,
:func:`sample_variation`, :func:`identity_rng`, :func:`image_rng`, and the
:class:`FaceIdentity` / :class:`ImageVariation` dataclasses.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from pipeline.cpu import available_cores

DOMAINS = ("a", "b")
HAIR_STYLES = ("short", "medium", "long", "fringe", "buzz", "bald")
SET_NAMES = ("train", "synth_closed", "synth_open", "synth_domain")
_GEOMETRY_SPREAD = 0.7  # fraction of each plausible geometry range that identities are drawn from

# canonical canvas extent in face units
_X0, _X1, _Y0, _Y1 = -2.0, 2.0, -1.7, 2.3
_Y_PIVOT = 0.15  # head rotation centre (y) in face units

_SKIN = np.array([(0.96, 0.82, 0.74), (0.91, 0.73, 0.62), (0.82, 0.62, 0.49), (0.68, 0.48, 0.35),
                  (0.52, 0.35, 0.24), (0.38, 0.25, 0.17), (0.27, 0.18, 0.12)], np.float32)
_HAIR = np.array([(0.05, 0.04, 0.04), (0.15, 0.10, 0.07), (0.30, 0.20, 0.12), (0.48, 0.35, 0.22),
                  (0.76, 0.62, 0.40), (0.52, 0.24, 0.11), (0.55, 0.54, 0.52), (0.80, 0.79, 0.76)],
                 np.float32)
_HAIR_P = np.array([0.24, 0.25, 0.17, 0.11, 0.10, 0.05, 0.05, 0.03])
_IRIS = np.array([(0.22, 0.13, 0.07), (0.38, 0.24, 0.12), (0.42, 0.36, 0.17), (0.28, 0.40, 0.24),
                  (0.28, 0.44, 0.62), (0.45, 0.50, 0.56)], np.float32)
_IRIS_P = np.array([0.35, 0.25, 0.12, 0.08, 0.14, 0.06])


# ----------------------------------------------------------------------------- dataclasses
@dataclass(frozen=True)
class FaceIdentity:
    """Everything fixed for one person. Lengths in face units (~10 cm), angles in radians,
    colours RGB in [0, 1]."""

    face_width: float  # half-width of the head at the cheekbones
    skull_height: float  # eye line to top of skull
    chin_height: float  # eye line to chin
    jaw_width: float  # chin-end width factor of the lower face (0.6 pointed .. 1 square)
    jaw_square: float  # superellipse exponent of the lower face outline
    eye_spacing: float  # half the distance between the eye centres
    eye_size: float  # half-width of one eye
    eye_height: float  # half-height / half-width of the open eye
    eye_tilt: float  # slope of the eye axis, outer corner up positive
    brow_height: float  # brow centre above the eye line
    brow_arch: float
    brow_thickness: float
    brow_tilt: float
    nose_length: float  # eye line to nose tip
    nose_width: float  # half-width of the nostril wings
    nose_depth: float  # protrusion of the tip
    mouth_y: float  # eye line to the lip line
    mouth_width: float  # half-width of the mouth
    upper_lip: float
    lower_lip: float
    ear_size: float
    skin: tuple[float, float, float]
    lip: tuple[float, float, float]
    blush: float
    hair: tuple[float, float, float]
    brow_color: tuple[float, float, float]
    hair_style: str
    hair_volume: float
    hairline: float  # y of the hairline at the centre (negative = up)
    fringe: float  # y of the fringe edge (fringe style only)
    hair_length: float  # bottom y of medium/long hair
    iris: tuple[float, float, float]
    beard: float  # 0 none, ~0.4 stubble, ~1 full
    moustache: float
    moles: tuple[tuple[float, float, float], ...]  # (x, y, radius)
    neck_width: float
    shoulder_width: float
    texture_seed: int
    domain: str = "a"


@dataclass(frozen=True)
class ImageVariation:
    """Everything that changes between two photos of the same person.
    Angles in radians; ``scale`` is output pixels per face unit divided by image size."""

    yaw: float
    pitch: float
    roll: float
    scale: float
    shift_x: float  # face centre offset, fraction of image size
    shift_y: float
    light_azimuth: float  # 0 = frontal, + = light from the image right
    light_elevation: float  # + = light from above
    light_intensity: float
    ambient: float
    light_color: tuple[float, float, float]
    exposure: float
    gamma: float  # output = linear ** gamma
    smile: float  # 0..1
    mouth_open: float  # 0..1
    eye_open: float  # ~0.5..1.1
    brow_raise: float  # face units
    gaze_x: float  # -1..1
    gaze_y: float
    clothes: tuple[float, float, float]
    blur: float  # Gaussian sigma, output pixels
    noise: float  # sensor noise std, 0..255 scale
    jpeg_quality: int
    detail_seed: int  # background clutter and noise
    hair_volume: float = 1.0  # factor on the identity's hair volume
    hairline_shift: float = 0.0  # face units, + = lower
    hair_tint: float = 1.0  # brightness factor of the hair
    glasses: int = 0  # 0 none, 1 round, 2 rectangular frames
    glasses_color: tuple[float, float, float] = (0.1, 0.1, 0.1)


# ----------------------------------------------------------------------------- samplers
def _check_domain(domain: str) -> None:
    if domain not in DOMAINS:
        raise ValueError(f"unknown synthetic domain {domain!r}; allowed: {', '.join(DOMAINS)}")


def _lerp_palette(palette: np.ndarray, t: float) -> np.ndarray:
    pos = float(np.clip(t, 0.0, 1.0)) * (len(palette) - 1)
    i = min(int(pos), len(palette) - 2)
    return palette[i] * (1 - (pos - i)) + palette[i + 1] * (pos - i)


def _rgb(v: np.ndarray) -> tuple[float, float, float]:
    c = np.clip(np.asarray(v, np.float64), 0.0, 1.0)
    return (round(float(c[0]), 4), round(float(c[1]), 4), round(float(c[2]), 4))


def sample_identity(rng: np.random.Generator, domain: str = "a") -> FaceIdentity:
    """Draw one person. Geometry comes from the same distribution in every domain;
    ``domain`` ("a" or "b") shifts the skin-tone distribution (b: darker)."""
    _check_domain(domain)
    u = rng.uniform

    def span(lo: float, hi: float) -> float:  # geometry: the central part of a plausible range
        mid, half = (lo + hi) / 2, (hi - lo) / 2 * _GEOMETRY_SPREAD
        return float(rng.uniform(mid - half, mid + half))

    tone = 0.05 + rng.beta(2.0, 2.6) * 0.6 if domain == "a" else 0.35 + rng.beta(2.6, 2.0) * 0.6
    skin = _lerp_palette(_SKIN, tone) * np.array([1 + rng.normal(0, 0.03), 1 + rng.normal(0, 0.03), 1.0])
    lip = skin * np.array([0.92, 0.62, 0.62]) + np.array([0.05, 0.0, 0.01])
    hp = _HAIR_P.copy()
    if tone > 0.5:  # darker skin: mostly dark hair
        hp = np.array([0.55, 0.3, 0.08, 0.02, 0.01, 0.0, 0.03, 0.01])
    hair_idx = rng.choice(len(_HAIR), p=hp / hp.sum())
    hair = _HAIR[hair_idx] * (1 + rng.normal(0, 0.06, 3))
    brow = hair * 0.4 + np.array([0.10, 0.07, 0.05]) * 0.6 if hair_idx in (3, 4, 5, 6, 7) else hair * 0.85
    ip = _IRIS_P.copy()
    if tone > 0.45:
        ip = np.array([0.6, 0.3, 0.07, 0.01, 0.01, 0.01])
    iris = _IRIS[rng.choice(len(_IRIS), p=ip / ip.sum())] * (1 + rng.normal(0, 0.08, 3))
    male = rng.random() < 0.5
    style_p = [0.42, 0.2, 0.05, 0.1, 0.16, 0.07] if male else [0.1, 0.3, 0.35, 0.2, 0.03, 0.02]
    style = HAIR_STYLES[rng.choice(len(HAIR_STYLES), p=style_p)]
    beard = 0.0
    if male and rng.random() < 0.35:
        beard = u(0.3, 0.5) if rng.random() < 0.5 else u(0.75, 1.0)
    moustache = (u(0.5, 1.0) if (beard > 0.6 or rng.random() < 0.15) else 0.0) if male else 0.0
    face_width = span(0.66, 0.82)
    n_moles = rng.choice(4, p=[0.55, 0.25, 0.15, 0.05])
    moles = tuple((round(u(-0.5, 0.5), 3), round(u(-0.1, 0.8), 3), round(u(0.008, 0.018), 4))
                  for _ in range(n_moles))
    eye_size = span(0.12, 0.155)
    nose_length, chin_height = span(0.36, 0.48), span(0.98, 1.15)
    # the lip line sits about a third of the way from the nose base to the chin
    mouth_y = nose_length + 0.06 + span(0.30, 0.40) * (chin_height - nose_length - 0.06)
    return FaceIdentity(
        face_width=face_width, skull_height=span(1.02, 1.18), chin_height=chin_height,
        jaw_width=span(0.55, 0.95), jaw_square=span(1.6, 3.4),
        eye_spacing=span(0.29, 0.35), eye_size=eye_size, eye_height=span(0.34, 0.46),
        eye_tilt=span(-0.12, 0.18), brow_height=span(0.15, 0.24), brow_arch=span(0.0, 0.06),
        brow_thickness=span(0.035, 0.065), brow_tilt=span(-0.04, 0.05),
        nose_length=nose_length, nose_width=span(0.09, 0.14), nose_depth=span(0.16, 0.28),
        mouth_y=mouth_y, mouth_width=span(0.19, 0.27), upper_lip=span(0.03, 0.055), lower_lip=span(0.045, 0.075),
        ear_size=span(0.85, 1.15), skin=_rgb(skin), lip=_rgb(lip), blush=u(0.0, 1.0),
        hair=_rgb(hair), brow_color=_rgb(brow), hair_style=style, hair_volume=span(0.04, 0.18),
        hairline=u(-0.68, -0.5) if style != "bald" else -0.9, fringe=u(-0.36, -0.28),
        hair_length=u(0.75, 1.05) if style == "medium" else u(1.4, 2.1),
        iris=_rgb(iris), beard=beard, moustache=moustache, moles=moles,
        neck_width=face_width * span(0.5, 0.62), shoulder_width=span(1.5, 1.9),
        texture_seed=int(rng.integers(0, 2**31 - 1)), domain=domain,
    )


def sample_variation(rng: np.random.Generator, domain: str = "a") -> ImageVariation:
    """Draw the per-photo variation. Domain "b" has harsher (less ambient, stronger and
    more lateral) and colder light than domain "a"."""
    _check_domain(domain)
    u = rng.uniform
    if domain == "a":
        az, el = u(-1.1, 1.1), u(0.0, 0.9)
        intensity, ambient = u(0.35, 0.8), u(0.35, 0.65)
        color = (u(0.94, 1.1), u(0.95, 1.04), u(0.82, 1.0))
    else:
        az, el = u(-1.3, 1.3), u(0.0, 1.0)
        intensity, ambient = u(0.75, 1.0), u(0.22, 0.38)
        color = (u(0.8, 0.96), u(0.94, 1.03), u(1.02, 1.2))
    smile = float(np.clip(rng.normal(0.3, 0.35), 0, 1))
    mouth_open = float(np.clip(rng.normal(0.0, 0.35), 0, 1)) if rng.random() < 0.5 else 0.0
    hsv = np.uint8([[[rng.integers(0, 180), rng.integers(20, 220), rng.integers(40, 230)]]])
    clothes = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0] / 255.0
    return ImageVariation(
        yaw=float(np.clip(rng.normal(0, 0.3), -0.7, 0.7)),
        pitch=float(np.clip(rng.normal(0, 0.12), -0.3, 0.3)),
        roll=float(np.clip(rng.normal(0, 0.12), -0.26, 0.26)),
        scale=u(0.24, 0.32), shift_x=u(-0.06, 0.06), shift_y=u(-0.06, 0.06),
        light_azimuth=az, light_elevation=el, light_intensity=intensity, ambient=ambient,
        light_color=color, exposure=u(0.75, 1.25), gamma=u(0.85, 1.2),
        smile=smile, mouth_open=mouth_open, eye_open=float(np.clip(rng.normal(0.9, 0.12), 0.5, 1.15)),
        brow_raise=float(np.clip(rng.normal(0, 0.015), -0.03, 0.04)),
        gaze_x=float(np.clip(rng.normal(0, 0.3), -1, 1)), gaze_y=float(np.clip(rng.normal(0, 0.2), -1, 1)),
        clothes=_rgb(clothes),
        blur=float(abs(rng.normal(0, 0.7))), noise=float(u(0.5, 5.0)),
        jpeg_quality=int(rng.integers(55, 96)), detail_seed=int(rng.integers(0, 2**31 - 1)),
        hair_volume=u(0.6, 1.4), hairline_shift=u(-0.07, 0.07), hair_tint=u(0.8, 1.2),
        glasses=int(rng.choice(3, p=[0.84, 0.08, 0.08])), glasses_color=_rgb(rng.uniform(0.02, 0.45, 3)),
    )


# ----------------------------------------------------------------------------- canonical canvas
@functools.lru_cache(maxsize=8)
def _axes(ppu: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (face units) of the canonical canvas: xs (W,), ys (H,)."""
    w, h = int(round((_X1 - _X0) * ppu)), int(round((_Y1 - _Y0) * ppu))
    xs = (_X0 + (np.arange(w, dtype=np.float32) + 0.5) / ppu).astype(np.float32)
    ys = (_Y0 + (np.arange(h, dtype=np.float32) + 0.5) / ppu).astype(np.float32)
    return xs, ys


class _Canvas:
    """Canonical-grid layer: ``data`` (H, W, 5) float32 = premultiplied RGB, alpha, specular."""

    def __init__(self, ppu: int, data: np.ndarray | None = None):
        self.ppu = ppu
        self.xs, self.ys = _axes(ppu)
        self.data = np.zeros((len(self.ys), len(self.xs), 5), np.float32) if data is None else data

    def roi(self, x0: float, x1: float, y0: float, y1: float):
        """Slices and coordinate arrays X (1,w), Y (h,1) of a face-unit box."""
        p = self.ppu
        c0 = max(int((x0 - _X0) * p), 0)
        c1 = min(int(math.ceil((x1 - _X0) * p)) + 1, len(self.xs))
        r0 = max(int((y0 - _Y0) * p), 0)
        r1 = min(int(math.ceil((y1 - _Y0) * p)) + 1, len(self.ys))
        return (slice(r0, r1), slice(c0, c1)), self.xs[None, c0:c1], self.ys[r0:r1, None]

    def edge(self, d: np.ndarray, soft: float = 1.0) -> np.ndarray:
        """Anti-aliased inside indicator from a signed distance d (face units, + inside)."""
        return np.clip(d * (self.ppu / soft) + 0.5, 0.0, 1.0).astype(np.float32)

    def paint(self, sl, mask: np.ndarray, color, spec: float = 0.0) -> None:
        """Porter-Duff 'over' of colour (3,) or (h, w, 3) with coverage ``mask`` (h, w)."""
        m = np.asarray(mask, np.float32)[..., None]
        d = self.data[sl]
        col = np.asarray(color, np.float32)
        d *= 1.0 - m
        d[..., :3] += col * m
        d[..., 3:4] += m
        d[..., 4:5] += np.float32(spec) * m

    def darken(self, sl, amount: np.ndarray, tint=(0.0, 0.0, 0.0)) -> None:
        """Multiply colour towards ``tint`` (multiplicative, per channel) by ``amount`` in [0, 1]."""
        f = 1.0 - np.asarray(amount, np.float32)[..., None] * (1.0 - np.asarray(tint, np.float32))
        self.data[sl][..., :3] *= f


def _head_half_width(idn: FaceIdentity, y: np.ndarray, grow: float = 0.0) -> np.ndarray:
    """Half-width of the head outline at height y (face units); 0 outside the head.
    ``grow`` enlarges the skull part (above the ears) outwards and upwards, for hair."""
    y_w, y_mid = -0.25, 0.08  # widest skull line, start of the jaw
    top, chin = -idn.skull_height - 1.3 * grow, idn.chin_height
    fw = idn.face_width
    t_up = np.clip((y_w - y) / (y_w - top), 0.0, 1.0)
    up = (fw + grow) * np.clip(1.0 - t_up**2.2, 0.0, 1.0) ** (1 / 2.2)
    t_lo = np.clip((y - y_mid) / (chin - y_mid), 0.0, 1.0)
    p = idn.jaw_square
    lo = fw * np.clip(1.0 - t_lo**p, 0.0, 1.0) ** (1.0 / p) * (1.0 - (1.0 - idn.jaw_width) * t_lo)
    w = np.where(y < y_mid, up, lo)
    return np.where((y > top) & (y < chin), w, 0.0).astype(np.float32)


def _gauss(X, Y, cx, cy, sx, sy):
    return np.exp(-(((X - cx) / sx) ** 2 + ((Y - cy) / sy) ** 2) * 0.5)


def _smoothstep(e0: float, e1: float, v):
    t = np.clip((v - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _face_height(idn: FaceIdentity, X: np.ndarray, Y: np.ndarray, hw: np.ndarray, depth: float) -> np.ndarray:
    """Height field (face units, towards the camera) of the head: an ellipsoid-like shell with
    Gaussian bumps for the nose, eye sockets, brow ridge, cheekbones, lips and chin. (H, W)."""
    u = np.where(hw > 0, X / np.maximum(hw, 1e-3), 2.0)
    v = np.where(Y < 0.05, (Y - 0.05) / (idn.skull_height + 0.05), (Y - 0.05) / (idn.chin_height - 0.05))
    z = depth * np.sqrt(np.clip(1 - u**2, 0, 1)) * np.clip(1 - v**2, 0, 1) ** 0.3
    es, ny, fw = idn.eye_spacing, idn.nose_length, idn.face_width
    my, mw = idn.mouth_y, idn.mouth_width
    t = np.clip(Y / ny, 0, 1)
    ridge = np.exp(-0.5 * (X / (0.035 + 0.05 * t)) ** 2) * np.exp(-np.clip(Y - ny + 0.02, 0, None) ** 2 / 0.0012)
    bumps = idn.nose_depth * t**1.7 * ridge
    for sgn in (-1.0, 1.0):
        bumps += 0.035 * _gauss(X, Y, sgn * idn.nose_width * 0.75, ny - 0.03, 0.04, 0.035)  # nostril wings
        bumps -= 0.09 * _gauss(X, Y, sgn * es, -0.01, 0.13, 0.08)  # eye sockets
        bumps += 0.025 * _gauss(X, Y, sgn * es, 0.0, 0.09, 0.045)  # eyeballs
        bumps += 0.05 * _gauss(X, Y, sgn * 0.58 * fw, 0.22, 0.12, 0.1)  # cheekbones
    bumps += 0.04 * np.exp(-0.5 * ((Y + idn.brow_height) / 0.06) ** 2) * (np.abs(X) < es + 0.15)
    bumps += 0.035 * _gauss(X, Y, 0, my - 0.03, mw * 0.7, 0.035) + 0.04 * _gauss(X, Y, 0, my + 0.045, mw * 0.6, 0.035)
    bumps += 0.04 * _gauss(X, Y, 0, idn.chin_height - 0.13, 0.11, 0.07)
    return z + bumps * np.clip(z / (0.5 * depth), 0, 1)


def _paint_face_details(base: _Canvas, idn: FaceIdentity, X, Y, head, fine, hair_img) -> None:
    """Blush, under-eye shadow, nostrils, alar creases, moles, beard and moustache."""
    fw, es, ny = idn.face_width, idn.eye_spacing, idn.nose_length
    my, mw = idn.mouth_y, idn.mouth_width
    everywhere = np.s_[:, :]
    blush = sum(_gauss(X, Y, sgn * 0.6 * fw, 0.25, 0.12, 0.09) for sgn in (-1, 1))
    blush = idn.blush * 0.22 * (blush + 0.6 * _gauss(X, Y, 0, ny - 0.02, 0.05, 0.04)) * head
    base.darken(everywhere, blush, tint=(1.0, 0.72, 0.72))
    under_eye = sum(_gauss(X, Y, sgn * es, 0.09, 0.1, 0.03) for sgn in (-1, 1))
    base.darken(everywhere, 0.10 * under_eye, tint=(0.6, 0.5, 0.55))
    nw = idn.nose_width
    for sgn in (-1.0, 1.0):
        sl, Xr, Yr = base.roi(sgn * nw * 0.5 - 0.08, sgn * nw * 0.5 + 0.08, ny - 0.1, ny + 0.06)
        d = np.sqrt(((Xr - sgn * nw * 0.48) / 0.03) ** 2 + ((Yr - ny - 0.008) / 0.014) ** 2)
        base.darken(sl, 0.85 * base.edge((1 - d) * 0.015), tint=(0.3, 0.2, 0.2))  # nostril
        ax, ay = sgn * nw * 0.78, ny - 0.025
        rr = np.sqrt((Xr - ax) ** 2 + (Yr - ay) ** 2)
        arc = np.exp(-0.5 * ((rr - 0.045) / 0.007) ** 2) * (Yr < ay + 0.02) * (sgn * (Xr - ax) > -0.03)
        base.darken(sl, 0.35 * arc, tint=(0.5, 0.4, 0.4))  # crease around the nostril wing
    for mx, mole_y, radius in idn.moles:
        mx = mx * fw / 0.75
        sl, Xr, Yr = base.roi(mx - 0.05, mx + 0.05, mole_y - 0.05, mole_y + 0.05)
        d = np.sqrt((Xr - mx) ** 2 + (Yr - mole_y) ** 2)
        base.darken(sl, 0.6 * base.edge(radius - d) * head[sl], tint=(0.35, 0.25, 0.2))
    if idn.beard > 0:  # chin, jaw and cheeks below a line from the sideburns to the mouth
        y_top = my - 0.03 - (my - 0.12) * _smoothstep(mw * 1.1, fw * 0.95, np.abs(X))
        area = _smoothstep(y_top, y_top + 0.07, Y) * head
        lips = base.edge(1 - np.sqrt((X / (mw * 1.15)) ** 2 + ((Y - my) / (idn.lower_lip + 0.04)) ** 2), soft=4.0)
        dens = np.clip(idn.beard * area * (1 - lips) * (0.85 + 0.3 * fine), 0, 1)
        base.paint(everywhere, dens, hair_img * 0.85, spec=0.1)
    if idn.moustache > 0:
        centre_y = my - idn.upper_lip - 0.035 + 0.35 * X**2
        band = base.edge(0.027 - np.abs(Y - centre_y)) * base.edge(mw * 1.1 - np.abs(X), soft=2.0) * head
        base.paint(everywhere, band * idn.moustache * np.clip(0.8 + 0.4 * fine, 0, 1), hair_img * 0.75, spec=0.1)


def _hair_cover(idn: FaceIdentity, cv: _Canvas, X, Y, vol: float, shift: float, wobble: np.ndarray) -> np.ndarray:
    """Coverage (h, w) of the hair on top of the head for hair volume ``vol`` and a hairline
    moved down by ``shift`` (face units); ``wobble`` (1, w) roughens the hairline."""
    fw = idn.face_width
    w_out = _head_half_width(idn, Y[:, 0], grow=vol * 0.7)[:, None] * (Y < 0.12)
    hl0 = (idn.fringe if idn.hair_style == "fringe" else idn.hairline) + shift
    hairline = hl0 + (0.1 - hl0) * np.clip(np.abs(X) / fw, 0, 1) ** 4 + wobble  # down to the sideburns
    cover = cv.edge(w_out - np.abs(X)) * cv.edge(hairline - Y, soft=1.5)
    if idn.hair_style == "bald":  # a fringe of hair above the ears only
        cover = cover * cv.edge(np.abs(X) - 0.8 * fw, soft=3.0) * _smoothstep(-0.5, -0.3, Y)
    return cover * {"buzz": 0.6, "bald": 0.85}.get(idn.hair_style, 0.97)


class _IdentityLayers:
    """Per-identity canonical layers: ``base`` (back hair, neck, ears, face with its fixed
    details), hair texture for the per-image hair cap, ``torso_cover`` (clothes, (H, W)),
    height field ``z`` (H, W), ``depth_stack`` (H, W, 3: z, dz/dx, dz/dy), unit ``normals``
    (3, H, W) and ambient occlusion ``ao`` (H, W)."""

    def __init__(self, idn: FaceIdentity, ppu: int):
        rng = np.random.default_rng(idn.texture_seed)
        self.ppu = ppu
        xs, ys = _axes(ppu)
        X, Y = xs[None, :], ys[:, None]
        H, W = len(ys), len(xs)
        fw = idn.face_width
        depth = 0.9 * fw  # head radius towards the camera
        self.z0 = 0.5 * depth  # rotation centre depth
        base = self.base = _Canvas(ppu)
        everywhere = np.s_[:, :]

        hw = _head_half_width(idn, ys)[:, None]
        head = base.edge(hw - np.abs(X)) * (hw > 0)
        z_face = _face_height(idn, X, Y, hw, depth) * head
        nw = idn.neck_width
        neck = base.edge(nw - np.abs(X)) * base.edge(Y - 0.3)
        z_neck = 0.55 * depth * np.sqrt(np.clip(1 - (X / nw) ** 2, 0, 1))
        yb = idn.chin_height + 0.05
        sw = nw + (idn.shoulder_width - nw) * _smoothstep(yb, yb + 0.55, Y) ** 0.5
        torso = base.edge(sw - np.abs(X)) * base.edge(Y - yb)
        z_torso = 0.5 * depth * np.sqrt(np.clip(1 - (X / np.maximum(sw, 1e-3)) ** 2, 0, 1))

        # textures: low-frequency + fine skin noise, vertical hair streaks
        low = cv2.resize(rng.normal(0, 1, (H // 14 + 1, W // 14 + 1)).astype(np.float32), (W, H),
                         interpolation=cv2.INTER_CUBIC)
        fine = cv2.GaussianBlur(rng.normal(0, 1, (H, W)).astype(np.float32), (0, 0), 0.8)
        skin_img = np.asarray(idn.skin, np.float32) * (1 + 0.025 * low + 0.035 * fine)[..., None]
        streak = cv2.GaussianBlur(rng.normal(0, 1, (H, W)).astype(np.float32), (0, 0), sigmaX=0.6, sigmaY=5.0)
        streak = np.tanh(streak / (streak.std() + 1e-6))[..., None]
        hair_img = np.asarray(idn.hair, np.float32) * (0.86 + 0.16 * streak) + 0.02 * streak
        vol = idn.hair_volume if idn.hair_style not in ("buzz", "bald") else 0.015

        z_back = np.zeros_like(z_face)
        if idn.hair_style in ("medium", "long"):  # behind neck and head
            L = idn.hair_length
            bw = fw + vol + 0.05 + 0.15 * _smoothstep(0.2, L, Y)
            bw = bw * np.sqrt(np.clip(1 - ((Y - (L - 0.3)) / 0.3).clip(0, None) ** 2, 0, 1))
            back = base.edge(bw - np.abs(X)) * base.edge(Y + 0.3) * base.edge(L - Y)
            base.paint(everywhere, back, hair_img * 0.8, spec=0.2)
            z_back = 0.25 * depth * back
        # back of the skull, just outside the outline: fills holes that strong yaw opens there
        skull = base.edge(_head_half_width(idn, ys, grow=0.14)[:, None] - np.abs(X), soft=3.0)
        skull = skull * _smoothstep(-0.45, -0.2, Y) * base.edge(0.3 - Y, soft=3.0)
        bald = idn.hair_style in ("bald", "buzz")
        base.paint(everywhere, skull, skin_img * 0.8 if bald else hair_img * 0.7, spec=0.1)
        base.paint(everywhere, neck, skin_img * 0.9, spec=0.05)
        ear_x = float(_head_half_width(idn, np.float32(0.17))) + 0.015
        ax, ay = 0.07 * idn.ear_size, 0.17 * idn.ear_size
        for sgn in (-1.0, 1.0):
            ear = base.edge((1 - np.sqrt(((X - sgn * ear_x) / ax) ** 2 + ((Y - 0.18) / ay) ** 2)) * ax)
            base.paint(everywhere, ear, skin_img * 0.93, spec=0.05)
            inner = np.sqrt(((X - sgn * (ear_x - 0.012)) / (ax * 0.55)) ** 2 + ((Y - 0.18) / (ay * 0.65)) ** 2)
            base.darken(everywhere, 0.35 * ear * base.edge((1 - inner) * ax * 0.5))
        base.paint(everywhere, head, skin_img, spec=0.12)
        _paint_face_details(base, idn, X, Y, head, fine, hair_img)
        # hair over the face: redrawn per image (volume, hairline, tint vary a little)
        wobble = 0.012 * cv2.GaussianBlur(rng.normal(0, 1, X.shape).astype(np.float32), (0, 0), 2.0)
        if idn.hair_style == "fringe":
            wobble += 0.015 * np.sin(X * 37.0 + rng.uniform(0, 6.28))
        self.hair_rows = int(np.searchsorted(ys, 0.15))  # the hair cap lies above this row
        self.hair_img, self.hair_wobble, self.hair_volume = hair_img[: self.hair_rows], wobble, vol
        cap_cover = np.zeros_like(z_face)
        cap_cover[: self.hair_rows] = _hair_cover(idn, base, X, Y[: self.hair_rows], vol, 0.0, wobble)

        # height field: body, face, hair volume; slightly blurred so the warp stays smooth
        top = -idn.skull_height - vol * 1.3
        w_out = _head_half_width(idn, ys, grow=vol * 0.7)[:, None]
        t_o = np.clip((0.1 - Y) / (0.1 - top), 0, 1)
        z_cap = (depth + vol) * np.sqrt(np.clip(1 - (X / np.maximum(w_out, 1e-3)) ** 2, 0, 1)) * np.clip(
            1 - t_o**2, 0, 1) ** 0.25
        zz = np.maximum.reduce([z_back, z_neck * neck - 0.05, z_torso * torso - 0.1])
        zz = zz * (1 - head) + z_face
        zz = zz * (1 - cap_cover) + np.maximum(zz, z_cap) * cap_cover
        zz = cv2.GaussianBlur(zz.astype(np.float32), (0, 0), 0.6 + ppu / 60.0)
        self.z = zz
        gy, gx = np.gradient(zz)
        gx, gy = np.clip(gx * ppu, -3, 3), np.clip(gy * ppu, -3, 3)
        inv_len = 1.0 / np.sqrt(gx * gx + gy * gy + 1.0)
        self.normals = np.stack([-gx * inv_len, -gy * inv_len, inv_len]).astype(np.float32)  # (3, H, W)
        self.depth_stack = np.stack([zz, gx, gy], -1).astype(np.float32)
        ao = np.clip(1 + 2.5 * (zz - cv2.GaussianBlur(zz, (0, 0), ppu * 0.12)), 0.55, 1.1)
        ao *= 1 - 0.45 * neck * _smoothstep(idn.chin_height + 0.3, idn.chin_height - 0.05, Y) * (1 - head)
        self.ao = ao.astype(np.float32)
        self.torso_cover = (torso * (1 - base.data[..., 3])).astype(np.float32)
        self.torso_row = int(np.searchsorted(ys, yb - 0.05))  # no clothes above this row


@functools.lru_cache(maxsize=16)
def _layers(idn: FaceIdentity, ppu: int) -> _IdentityLayers:
    return _IdentityLayers(idn, ppu)


# ----------------------------------------------------------------------------- per-image features
def _paint_eyes(cv: _Canvas, idn: FaceIdentity, var: ImageVariation, light: np.ndarray) -> None:
    """Eyes (lids, crease, sclera, iris, pupil, catchlight towards ``light`` (3,), lashes)
    and eyebrows, with this image's openness, gaze and brow raise."""
    ew = idn.eye_size
    ah = ew * idn.eye_height * var.eye_open
    for sgn in (-1.0, 1.0):
        cx = sgn * idn.eye_spacing
        sl, X, Y = cv.roi(cx - ew * 1.6, cx + ew * 1.6, -idn.brow_height - idn.brow_arch - 0.1, 0.12)
        t = (X - cx) / ew
        outward = t * sgn  # +1 at the outer corner
        yc = -idn.eye_tilt * (X - cx) * sgn
        f = np.clip(1 - t**2, 0, None)
        up = yc - ah * 1.25 * f * (1 - 0.2 * outward)
        lo = yc + ah * 0.75 * f * (1 + 0.15 * outward)
        inside_t = cv.edge((1 - np.abs(t)) * ew)
        aperture = cv.edge(Y - up) * cv.edge(lo - Y) * inside_t
        # upper lid skin and crease
        crease_y = up - 0.04 - 0.015 * f
        lid = cv.edge(Y - crease_y) * cv.edge(up - Y + 0.01) * cv.edge((1.1 - np.abs(t)) * ew)
        cv.darken(sl, 0.10 * lid, tint=(0.75, 0.7, 0.75))
        crease = np.exp(-0.5 * ((Y - crease_y) / 0.008) ** 2) * np.clip(1 - t**2, 0, 1)
        cv.darken(sl, 0.35 * crease, tint=(0.55, 0.45, 0.45))
        # sclera with corner shading, iris, pupil
        sclera = np.array([0.92, 0.89, 0.86], np.float32) * (1 - 0.25 * np.abs(t) ** 3)[..., None]
        cv.paint(sl, aperture, sclera, spec=0.5)
        ri = 0.45 * ew
        ix = cx + var.gaze_x * ew * 0.3
        iy = var.gaze_y * ah * 0.3
        r = np.sqrt((X - ix) ** 2 + (Y - iy) ** 2)
        iris_col = np.asarray(idn.iris, np.float32) * (1 - 0.45 * _smoothstep(0.6 * ri, ri, r))[..., None]
        cv.paint(sl, cv.edge(ri - r) * aperture, iris_col, spec=0.6)
        cv.paint(sl, cv.edge(0.42 * ri - r) * aperture, (0.02, 0.02, 0.02), spec=0.6)
        # upper lid shadow on the eyeball, catchlight
        shadow = np.exp(-np.clip(Y - up, 0, None) / max(0.35 * ah, 1e-3)) * aperture
        cv.darken(sl, 0.45 * shadow)
        hx, hy = ix + light[0] * ri * 0.45, iy + light[1] * ri * 0.45
        hl = cv.edge(0.16 * ri - np.sqrt((X - hx) ** 2 + (Y - hy) ** 2)) * aperture
        cv.paint(sl, hl * 0.85, (1.0, 1.0, 1.0), spec=0.0)
        # lash line (thick, dark, slightly beyond the outer corner) and lower lid
        lash_t = np.clip(1 - (t / 1.08) ** 2, 0, None)
        lash_y = yc - ah * 1.25 * lash_t * (1 - 0.2 * outward)
        th = 0.010 + 0.012 * lash_t
        lash = cv.edge(th - np.abs(Y - lash_y + th * 0.4)) * cv.edge((1.1 - np.abs(t)) * ew)
        cv.paint(sl, lash * 0.92, (0.05, 0.035, 0.03), spec=0.1)
        lower = np.exp(-0.5 * ((Y - lo - 0.004) / 0.005) ** 2) * np.clip(1 - t**2, 0, 1)
        cv.darken(sl, 0.4 * lower, tint=(0.6, 0.45, 0.45))
        # brow
        bcx = cx + sgn * 0.12 * ew
        bw = ew * 1.3
        tb = (X - bcx) / bw * sgn  # -1 inner .. +1 outer
        by = (-idn.brow_height - var.brow_raise - idn.brow_arch * (1 - (tb * 0.9 - 0.15) ** 2)
              + idn.brow_tilt * tb)
        thick = idn.brow_thickness * (1.05 - 0.4 * np.clip((tb + 1) / 2, 0, 1))
        ends = cv.edge((1 - np.abs(tb)) * bw, soft=3.0)
        brow = cv.edge(thick / 2 - np.abs(Y - by), soft=1.5) * ends
        cv.paint(sl, brow * 0.9, np.asarray(idn.brow_color, np.float32), spec=0.15)


def _mouth_curves(idn: FaceIdentity, var: ImageVariation, X: np.ndarray):
    """Lip curves (face units) at x: meeting line, inner upper/lower, outer upper/lower."""
    mw = idn.mouth_width * (1 + 0.12 * var.smile)
    t = X / mw
    lift = 0.05 * var.smile
    gap = 0.09 * var.mouth_open
    f = np.clip(1 - t**2, 0, None)
    y_m = idn.mouth_y - lift * t**2 + 0.01 * var.smile * f
    y_ui = y_m - gap * 0.4 * f**0.7
    y_li = y_m + gap * 0.6 * f**0.7
    bow = 1 - 0.35 * np.exp(-0.5 * (X / 0.03) ** 2)
    y_uo = y_ui - idn.upper_lip * np.clip(1 - np.abs(t) ** 1.8, 0, None) ** 0.6 * bow
    y_lo = y_li + idn.lower_lip * np.clip(1 - np.abs(t) ** 2.2, 0, None) ** 0.6
    return mw, t, y_m, y_ui, y_li, y_uo, y_lo


def _paint_glasses(cv: _Canvas, idn: FaceIdentity, var: ImageVariation) -> None:
    """Thin frames around the eyes (round or rectangular), bridge and temple arms."""
    a, b = idn.eye_size * 1.45, idn.eye_size * 1.05
    p = 2.0 if var.glasses == 1 else 5.0
    cy, th = 0.015, 0.012
    color = np.asarray(var.glasses_color, np.float32)
    for sgn in (-1.0, 1.0):
        cx = sgn * idn.eye_spacing
        sl, X, Y = cv.roi(cx - a - 0.04, cx + a + 0.04, cy - b - 0.04, cy + b + 0.04)
        r = ((np.abs(X - cx) / a) ** p + (np.abs(Y - cy) / b) ** p) ** (1 / p)
        cv.darken(sl, 0.12 * cv.edge((1 - r) * b), tint=(0.8, 0.85, 0.9))  # tinted lens
        cv.paint(sl, cv.edge(th - np.abs(r - 1) * b), color, spec=0.6)
        # temple arm from the outer rim to the side of the head
        x_out, x_side = cx + sgn * a, sgn * (_head_half_width(idn, np.float32(cy)) + 0.01)
        sl, X, Y = cv.roi(min(x_out, x_side), max(x_out, x_side), cy - 0.05, cy + 0.01)
        arm = cv.edge(th * 0.8 - np.abs(Y - (cy - 0.3 * b))) * cv.edge(sgn * (X - x_out) + 0.005)
        cv.paint(sl, arm, color * 0.9, spec=0.4)
    inner = idn.eye_spacing - a
    sl, X, Y = cv.roi(-inner - 0.02, inner + 0.02, cy - b, cy)
    bridge_y = cy - 0.45 * b + 0.04 * (X / max(inner, 1e-3)) ** 2
    cv.paint(sl, cv.edge(th - np.abs(Y - bridge_y)) * cv.edge(inner + 0.01 - np.abs(X)), color, spec=0.6)


def _paint_mouth(cv: _Canvas, idn: FaceIdentity, var: ImageVariation) -> None:
    """Nasolabial folds, lips (smile and opening of this image), teeth, lip line, corners."""
    my = idn.mouth_y
    mw0 = idn.mouth_width * 1.2
    sl, X, Y = cv.roi(-mw0 - 0.05, mw0 + 0.05, idn.nose_length + 0.02, my + 0.2)
    mw, t, y_m, y_ui, y_li, y_uo, y_lo = _mouth_curves(idn, var, X)
    inside = cv.edge((1 - np.abs(t)) * mw)
    # nasolabial folds, stronger with a smile
    for sgn in (-1.0, 1.0):
        x0, y0 = sgn * idn.nose_width * 1.15, idn.nose_length - 0.02
        x1, y1 = sgn * (mw + 0.04), my + 0.05
        s = np.clip((Y - y0) / (y1 - y0), 0, 1)
        xc = x0 + (x1 - x0) * s + sgn * 0.03 * np.sin(np.pi * s)
        fold = np.exp(-0.5 * ((X - xc) / 0.012) ** 2) * np.sin(np.pi * s) * (Y > y0) * (Y < y1)
        cv.darken(sl, (0.12 + 0.2 * var.smile) * fold, tint=(0.55, 0.45, 0.45))
    lip = np.asarray(idn.lip, np.float32)
    upper = cv.edge(Y - y_uo) * cv.edge(y_ui - Y) * inside
    lower = cv.edge(Y - y_li) * cv.edge(y_lo - Y) * inside
    cv.paint(sl, upper, lip * 0.88, spec=0.25)
    cv.paint(sl, lower, lip, spec=0.35)
    if var.mouth_open > 0.05:
        hole = cv.edge(Y - y_ui) * cv.edge(y_li - Y) * inside
        cv.paint(sl, hole, (0.16, 0.05, 0.05), spec=0.0)
        teeth_h = min(0.035, 0.09 * var.mouth_open * 0.5)
        teeth = cv.edge(Y - y_ui) * cv.edge(y_ui + teeth_h - Y) * cv.edge((0.65 - np.abs(t)) * mw)
        cv.paint(sl, teeth * 0.95, (0.88, 0.85, 0.78), spec=0.3)
    line = np.exp(-0.5 * ((Y - y_m) / 0.0065) ** 2) * np.clip(1 - np.abs(t) ** 6, 0, 1) * (var.mouth_open < 0.05)
    cv.darken(sl, 0.7 * line, tint=(0.3, 0.15, 0.15))
    for sgn in (-1.0, 1.0):  # corner shadows
        cx, cy = sgn * mw, idn.mouth_y - 0.05 * var.smile
        corner = np.exp(-0.5 * (((X - cx) / 0.015) ** 2 + ((Y - cy) / 0.012) ** 2))
        cv.darken(sl, 0.5 * corner, tint=(0.4, 0.3, 0.3))


# ----------------------------------------------------------------------------- pose and output
def _rotation(var: ImageVariation) -> np.ndarray:
    """Head rotation (3, 3): pitch about x after yaw about y (radians), canonical -> camera."""
    cy, sy = math.cos(var.yaw), math.sin(var.yaw)
    cp, sp = math.cos(var.pitch), math.sin(var.pitch)
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    return rx @ ry


def _ppu(size: int) -> int:
    """Canonical canvas pixels per face unit for an output image of ``size`` pixels."""
    return int(max(20, round(0.33 * size)))


def _similarity(var: ImageVariation, size: int):
    """Output pixel centre of the pivot, pixels per face unit and the roll matrix."""
    centre = np.array([size * (0.5 + var.shift_x), size * (0.5 + var.shift_y)])
    cr, sr = math.cos(var.roll), math.sin(var.roll)
    return centre, var.scale * size, np.array([[cr, -sr], [sr, cr]])


def _to_px(ppu: int, x, y):
    """Face units -> canonical canvas pixel coordinates (float32 x, y)."""
    return ((x - _X0) * ppu - 0.5).astype(np.float32), ((y - _Y0) * ppu - 0.5).astype(np.float32)


def _inverse_warp(layers: _IdentityLayers, var: ImageVariation, size: int):
    """Canonical pixel maps (map_x, map_y), each (size, size) float32, for cv2.remap.

    Newton steps solve M (s - pivot) + m (z(s) - z0) = q for the canonical point s seen at
    each output pixel (q: output pixel with the similarity removed, face units). Solved on
    a half-resolution grid; the smooth maps are upsampled bilinearly."""
    R = _rotation(var)
    M, m = R[:2, :2].astype(np.float32), R[:2, 2].astype(np.float32)
    centre, upx, roll = _similarity(var, size)
    n = (size + 1) // 2
    g = np.arange(n, dtype=np.float32) * 2 + 0.5  # fine-pixel coordinate of each coarse pixel
    dx, dy = g[None, :] - np.float32(centre[0]), g[:, None] - np.float32(centre[1])
    r = (roll / upx).astype(np.float32)
    qx = r[0, 0] * dx + r[1, 0] * dy
    qy = r[0, 1] * dx + r[1, 1] * dy
    z0 = np.float32(layers.z0)
    Mi = np.linalg.inv(M).astype(np.float32)
    sx = Mi[0, 0] * qx + Mi[0, 1] * qy
    sy = Mi[1, 0] * qx + Mi[1, 1] * qy + np.float32(_Y_PIVOT)
    detM = float(np.linalg.det(M))
    ppu = np.float32(layers.ppu)
    ox, oy = np.float32(-_X0 * layers.ppu - 0.5), np.float32(-_Y0 * layers.ppu - 0.5)
    for _ in range(4):
        zs = cv2.remap(layers.depth_stack, sx * ppu + ox, sy * ppu + oy, cv2.INTER_LINEAR,
                       borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        z, zx, zy = zs[..., 0] - z0, zs[..., 1], zs[..., 2]
        syp = sy - np.float32(_Y_PIVOT)
        fx = M[0, 0] * sx + M[0, 1] * syp + m[0] * z - qx
        fy = M[1, 0] * sx + M[1, 1] * syp + m[1] * z - qy
        j00, j01 = M[0, 0] + m[0] * zx, M[0, 1] + m[0] * zy
        j10, j11 = M[1, 0] + m[1] * zx, M[1, 1] + m[1] * zy
        det = j00 * j11 - j01 * j10
        good = det > 0.25 * detM  # elsewhere ignore the slope (fold-over near silhouettes)
        det = np.where(good, det, np.float32(detM))
        j00, j01 = np.where(good, j00, M[0, 0]), np.where(good, j01, M[0, 1])
        j10, j11 = np.where(good, j10, M[1, 0]), np.where(good, j11, M[1, 1])
        sx -= np.clip((j11 * fx - j01 * fy) / det, -0.3, 0.3)
        sy -= np.clip((j00 * fy - j10 * fx) / det, -0.3, 0.3)
    mx = cv2.resize(sx * ppu + ox, (size, size), interpolation=cv2.INTER_LINEAR)
    my = cv2.resize(sy * ppu + oy, (size, size), interpolation=cv2.INTER_LINEAR)
    return mx, my


def _light_vectors(var: ImageVariation) -> tuple[np.ndarray, np.ndarray]:
    """Light and half vectors in the canonical (head) frame, each (3,) unit."""
    ca, sa = math.cos(var.light_azimuth), math.sin(var.light_azimuth)
    ce, se = math.cos(var.light_elevation), math.sin(var.light_elevation)
    L = np.array([sa * ce, -se, ca * ce])
    R = _rotation(var)
    Lc = R.T @ L
    Vc = R.T @ np.array([0.0, 0.0, 1.0])
    Hc = Lc + Vc
    return Lc, Hc / np.linalg.norm(Hc)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Random gradient with blurred clutter shapes, (size, size, 3) float32 in [0, 1].
    Drawn at half resolution (it is out of focus anyway) and upsampled."""
    h = (size + 1) // 2
    c1 = rng.uniform(0.05, 0.95, 3)
    c2 = np.clip(c1 + rng.normal(0, 0.25, 3), 0, 1)
    ang = rng.uniform(0, 2 * math.pi)
    g = np.linspace(-0.5, 0.5, h, dtype=np.float32)
    t = ((math.cos(ang) * g[None, :] + math.sin(ang) * g[:, None] + 0.71) / 1.42)[..., None]
    img8 = np.ascontiguousarray((255 * (c1 * (1 - t) + c2 * t)).astype(np.uint8))
    for _ in range(int(rng.integers(2, 8))):
        over = img8.copy()
        col = tuple(int(v) for v in rng.integers(0, 256, 3))
        kind = rng.integers(0, 3)
        p1 = tuple(int(v) for v in rng.integers(-h // 4, h + h // 4, 2))
        if kind == 0:
            p2 = tuple(int(v) for v in rng.integers(-h // 4, h + h // 4, 2))
            cv2.rectangle(over, p1, p2, col, -1, cv2.LINE_AA)
        elif kind == 1:
            cv2.circle(over, p1, int(rng.integers(h // 16, h // 3)), col, -1, cv2.LINE_AA)
        else:
            p2 = tuple(int(v) for v in rng.integers(-h // 4, h + h // 4, 2))
            cv2.line(over, p1, p2, col, int(rng.integers(1, max(2, h // 20))), cv2.LINE_AA)
        alpha = rng.uniform(0.2, 0.7)
        img8 = cv2.addWeighted(over, alpha, img8, 1 - alpha, 0)
    img8 = cv2.GaussianBlur(img8, (0, 0), rng.uniform(0.4, 1.5) * h / 80)
    return cv2.resize(img8, (size, size), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255.0


def _check_size(size: int) -> None:
    if not isinstance(size, (int, np.integer)) or size < 48:
        raise ValueError(f"image_size must be an integer >= 48 pixels, got {size!r}")


def render_face(identity: FaceIdentity, variation: ImageVariation, size: int) -> np.ndarray:
    """Render one photo: (size, size, 3) uint8 RGB, before JPEG compression.
    Deterministic in (identity, variation, size)."""
    _check_size(size)
    ppu = _ppu(size)
    layers = _layers(identity, ppu)
    cv = _Canvas(ppu, layers.base.data.copy())
    clothes = np.array([*variation.clothes, 1.0, 0.03], np.float32)
    r0 = layers.torso_row  # clothes under everything
    cv.data[r0:] += layers.torso_cover[r0:, :, None] * clothes
    Lc, Hc = _light_vectors(variation)
    _paint_eyes(cv, identity, variation, Lc)
    _paint_mouth(cv, identity, variation)
    d = cv.data
    rows = layers.hair_rows  # hair over the face
    cover = _hair_cover(identity, cv, cv.xs[None, :], cv.ys[:rows, None], layers.hair_volume * variation.hair_volume,
                        variation.hairline_shift, layers.hair_wobble)[..., None]
    d[:rows] *= 1 - cover
    d[:rows, :, :3] += cover * layers.hair_img * np.float32(variation.hair_tint)
    d[:rows, :, 3:4] += cover
    d[:rows, :, 4:5] += 0.25 * cover
    if variation.glasses:  # glasses over the hair
        _paint_glasses(_Canvas(ppu, d), identity, variation)
    # shading in the canonical frame: wrapped Lambert * ambient occlusion + Blinn-Phong
    nx, ny, nz = layers.normals
    Lc, Hc = Lc.astype(np.float32), Hc.astype(np.float32)
    ndl = nx * Lc[0] + ny * Lc[1] + nz * Lc[2]
    shade = (variation.ambient + variation.light_intensity * np.clip((ndl + 0.2) / 1.2, 0, 1)) * layers.ao
    ndh = np.clip(nx * Hc[0] + ny * Hc[1] + nz * Hc[2], 0, 1)
    ndh *= ndh  # ndh ** 16
    ndh *= ndh
    ndh *= ndh
    ndh *= ndh
    spec = d[..., 4] * d[..., 3] * ndh * np.float32(variation.light_intensity) * (ndl > 0)
    premult = d[..., :4].copy()
    premult[..., :3] *= shade[..., None]
    premult[..., :3] += spec[..., None]
    mx, my = _inverse_warp(layers, variation, size)
    fg = cv2.remap(premult, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                   borderValue=0)
    rng = np.random.default_rng(variation.detail_seed)
    bg = _background(rng, size)
    light = np.asarray(variation.light_color, np.float32) * variation.exposure
    bg_gain = 0.6 + 0.4 * light
    img = fg[..., :3] * light + bg * (1 - fg[..., 3:4]) * bg_gain
    if variation.blur > 0.25:
        img = cv2.GaussianBlur(img, (0, 0), variation.blur * size / 160)
    img = img + rng.standard_normal(img.shape, dtype=np.float32) * np.float32(variation.noise / 255.0)
    # tone curve out = in ** gamma through a 4096-entry table, then 8 bits
    lut = np.round(255.0 * np.linspace(0.0, 1.0, 4096) ** variation.gamma).astype(np.uint8)
    return lut[(np.clip(img, 0.0, 1.0) * 4095.0 + 0.5).astype(np.int32)]


def face_landmarks(identity: FaceIdentity, variation: ImageVariation, size: int) -> np.ndarray:
    """Where the 5 drawn landmarks land in the rendered image: (5, 2) float pixels (x, y) in
    MTCNN order: eye on the image left, eye on the image right, nose tip, mouth corner on the
    image left, mouth corner on the image right."""
    _check_size(size)
    ppu = _ppu(size)
    layers = _layers(identity, ppu)
    mw, *_rest = _mouth_curves(identity, variation, np.zeros(1))
    y_corner = identity.mouth_y - 0.05 * variation.smile
    pts = np.array([[-identity.eye_spacing, 0.0], [identity.eye_spacing, 0.0],
                    [0.0, identity.nose_length - 0.02], [-mw, y_corner], [mw, y_corner]], np.float64)
    px, py = _to_px(ppu, pts[:, 0], pts[:, 1])
    z = cv2.remap(layers.z, px[None, :], py[None, :], cv2.INTER_LINEAR)[0].astype(np.float64)
    R = _rotation(variation)
    rel = np.stack([pts[:, 0], pts[:, 1] - _Y_PIVOT, z - layers.z0], 1)
    proj = rel @ R[:2, :].T
    centre, upx, roll = _similarity(variation, size)
    return centre + upx * proj @ roll.T


# ----------------------------------------------------------------------------- dataset generation
def _code(name: str) -> int:
    return zlib.crc32(name.encode())


def identity_rng(seed: int, group: str, index: int) -> np.random.Generator:
    """RNG of identity ``index`` (0-based) of a group ("train", "open", "domain")."""
    return np.random.default_rng([seed, _code("identity"), _code(group), index])


def image_rng(seed: int, set_name: str, identity_index: int, image_index: int) -> np.random.Generator:
    """RNG of one image; independent of every count, so parallel generation and changed set
    sizes leave the other images byte-identical."""
    return np.random.default_rng([seed, _code("image"), _code(set_name), identity_index, image_index])


@dataclass(frozen=True)
class _SetSpec:
    name: str  # set name and image sub-folder
    group: str  # identity group: name prefix and identity seed
    domain: str
    identities: int
    images_per_identity: int


def _render_identity_task(task: tuple) -> int:
    """Worker: render and write every image of one identity (in each set that holds it);
    returns the number of images written."""
    seed, group, domain, index, size, jobs = task
    identity = sample_identity(identity_rng(seed, group, index), domain)
    name = f"{group}_{index + 1:04d}"
    for set_name, folder, n_images in jobs:
        out = Path(folder) / name
        out.mkdir(parents=True, exist_ok=True)
        for j in range(n_images):
            var = sample_variation(image_rng(seed, set_name, index, j), domain)
            img = render_face(identity, var, size)
            ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(img[..., ::-1]),
                                   [cv2.IMWRITE_JPEG_QUALITY, var.jpeg_quality])
            if not ok:
                raise RuntimeError(f"JPEG encoding failed for {out / name}_{j + 1:04d}.jpg")
            (out / f"{name}_{j + 1:04d}.jpg").write_bytes(buf.tobytes())
    return sum(n for _, _, n in jobs)


def _worker_init() -> None:
    cv2.setNumThreads(1)


def _sample_pairs(identities: list[str], n_images: int, folds: int, pairs_per_fold: int,
                  rng: np.random.Generator, set_name: str) -> pd.DataFrame:
    """LFW-style folds: identities dealt round-robin (after a seeded shuffle) to folds; per fold
    ``pairs_per_fold // 2`` same pairs then the different pairs, all distinct, drawn uniformly.

    A fold that holds a single identity takes the second image of its different pairs from
    the other folds (identity-disjointness is then impossible)."""
    n_same = pairs_per_fold // 2
    n_diff = pairs_per_fold - n_same
    order = rng.permutation(len(identities))
    ids_all = np.array(identities)
    rows: list[tuple[int, str, str, int]] = []

    def img(ident: str, j: int) -> str:
        return f"{ident}/{ident}_{j + 1:04d}"

    ia, ib = np.triu_indices(n_images, 1)
    for f in range(folds):
        ids = ids_all[order[f::folds]]
        cap = len(ids) * len(ia)
        if cap < n_same:
            raise ValueError(f"{set_name}: fold {f + 1} has {len(ids)} identities x {n_images} images, "
                             f"only {cap} distinct same pairs, but pairs_per_fold={pairs_per_fold} "
                             f"needs {n_same}")
        for k in rng.choice(cap, n_same, replace=False):
            ident, p = ids[k // len(ia)], k % len(ia)
            rows.append((f + 1, img(ident, int(ia[p])), img(ident, int(ib[p])), 1))
        # different pairs; flat image index k -> (identity k // n_images, image k % n_images)
        if len(ids) >= 2:
            first, second = ids, ids
            ca, cb = np.triu_indices(len(ids) * n_images, 1)
            keep = ca // n_images != cb // n_images
            ca, cb = ca[keep], cb[keep]
        else:
            first, second = ids, np.setdiff1d(ids_all, ids)
            m = len(second) * n_images
            ca, cb = np.repeat(np.arange(n_images), m), np.tile(np.arange(m), n_images)
        if len(ca) < n_diff:
            raise ValueError(f"{set_name}: fold {f + 1} allows only {len(ca)} distinct different "
                             f"pairs, but pairs_per_fold={pairs_per_fold} needs {n_diff}")
        for c in rng.choice(len(ca), n_diff, replace=False):
            a, b = int(ca[c]), int(cb[c])
            rows.append((f + 1, img(first[a // n_images], a % n_images),
                         img(second[b // n_images], b % n_images), 0))
    return pd.DataFrame(rows, columns=["fold", "image_id1", "image_id2", "same"]).astype(
        {"fold": "int64", "same": "int64"})


def _positive_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def generate_synthetic(
    out_dir: Path, *, seed: int,
    train_identities: int = 80, train_images_per_identity: int = 20,
    closed_images_per_identity: int = 4,
    open_identities: int = 50, domain_identities: int = 50,
    test_images_per_identity: int = 6,
    image_size: int = 160, folds: int = 10, pairs_per_fold: int = 60,
    workers: int | None = None, progress: bool = True, only: Collection[str] | None = None,
    render: bool = True,
) -> dict[str, tuple[pd.DataFrame, pd.DataFrame | None]]:
    """Write the synthetic face sets as JPEGs and return their image tables and pairs.

    Files: ``out_dir/images/<set>/<identity>/<identity>_<NNNN>.jpg`` (NNNN from 0001), RGB,
    ``image_size`` x ``image_size`` pixels. Sets: ``train`` (identities ``train_0001``...,
    domain a, no pairs), ``synth_closed`` (other images of the train identities),
    ``synth_open`` (``open_0001``..., unseen, domain a) and ``synth_domain``
    (``domain_0001``..., unseen, domain b: darker skin tones, harsher colder light).

    Returns ``{set: (images, pairs)}``: images has columns image_id
    (``<identity>/<identity>_<NNNN>``), path (``str(out_dir / ...)``), identity; pairs has
    fold (1..folds), image_id1, image_id2, same (1/0), ``pairs_per_fold`` per fold, half same.
    Same seed and arguments give byte-identical files whatever ``workers`` is.

    ``only``: render and return these sets alone (the data stage of each set asks for its own);
    every image and pair is the same as when all four are generated together, because each
    image's random numbers depend only on its set, identity and index. ``render=False`` returns
    the tables without writing any image.
    """
    out_dir = Path(out_dir)
    _positive_int("seed", seed, 0)
    for name, value, minimum in [("train_identities", train_identities, 1),
                                 ("train_images_per_identity", train_images_per_identity, 1),
                                 ("closed_images_per_identity", closed_images_per_identity, 2),
                                 ("open_identities", open_identities, 1),
                                 ("domain_identities", domain_identities, 1),
                                 ("test_images_per_identity", test_images_per_identity, 2),
                                 ("folds", folds, 1), ("pairs_per_fold", pairs_per_fold, 2)]:
        _positive_int(name, value, minimum)
    _check_size(image_size)
    if pairs_per_fold % 2:
        raise ValueError(f"pairs_per_fold must be even (half same, half different), got {pairs_per_fold}")
    if workers is not None:
        _positive_int("workers", workers, 1)
    specs = [_SetSpec("train", "train", "a", train_identities, train_images_per_identity),
             _SetSpec("synth_closed", "train", "a", train_identities, closed_images_per_identity),
             _SetSpec("synth_open", "open", "a", open_identities, test_images_per_identity),
             _SetSpec("synth_domain", "domain", "b", domain_identities, test_images_per_identity)]
    for spec in specs[1:]:
        if folds > spec.identities:
            raise ValueError(f"folds={folds} exceeds the {spec.identities} identities of {spec.name}; "
                             f"need at least one identity per fold")
        if spec.identities < 2:
            raise ValueError(f"{spec.name} needs at least 2 identities for different pairs, "
                             f"got {spec.identities}")

    if only is not None:
        unknown = sorted(set(only) - {spec.name for spec in specs})
        if unknown:
            raise ValueError(f"unknown synthetic set(s) {', '.join(unknown)}; the sets are "
                             f"{', '.join(spec.name for spec in specs)}")
    result: dict[str, tuple[pd.DataFrame, pd.DataFrame | None]] = {}
    for spec in specs:  # tables and pairs first: impossible pair counts fail before any rendering
        names = [f"{spec.group}_{i + 1:04d}" for i in range(spec.identities)]
        rows = [(f"{n}/{n}_{j + 1:04d}", str(out_dir / "images" / spec.name / n / f"{n}_{j + 1:04d}.jpg"), n)
                for n in names for j in range(spec.images_per_identity)]
        images = pd.DataFrame(rows, columns=["image_id", "path", "identity"])
        pairs = None
        if spec.name != "train":
            rng = np.random.default_rng([seed, _code("pairs"), _code(spec.name)])
            pairs = _sample_pairs(names, spec.images_per_identity, folds, pairs_per_fold, rng, spec.name)
        result[spec.name] = (images, pairs)

    if only is not None:
        specs = [spec for spec in specs if spec.name in only]
        result = {name: tables for name, tables in result.items() if name in only}
    if not render:
        return result
    tasks = []  # one per identity: train identities render their closed-set images too
    for group in dict.fromkeys(spec.group for spec in specs):
        members = [spec for spec in specs if spec.group == group]
        jobs = [(spec.name, str(out_dir / "images" / spec.name), spec.images_per_identity) for spec in members]
        tasks += [(seed, group, members[0].domain, i, image_size, jobs) for i in range(members[0].identities)]
    total = sum(s.identities * s.images_per_identity for s in specs)
    n_workers = workers if workers is not None else available_cores()
    n_workers = min(n_workers, len(tasks))
    from tqdm.auto import tqdm

    with tqdm(total=total, unit="img", desc="synthetic faces", disable=not progress, mininterval=1.0) as bar:
        if n_workers <= 1:
            for task in tasks:
                bar.update(_render_identity_task(task))
        else:
            import multiprocessing

            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(n_workers, initializer=_worker_init) as pool:
                for count in pool.imap_unordered(_render_identity_task, tasks):
                    bar.update(count)
    return result
