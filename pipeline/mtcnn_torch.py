"""Batched PyTorch port of the ``mtcnn`` package's (1.0.0) three-stage face detector.

The networks (PNet, RNet, ONet) are the package's, loaded from its bundled weights
(``mtcnn/assets/weights/{pnet,rnet,onet}.lz4``, joblib-pickled lists of numpy arrays in
Keras order) without importing ``mtcnn`` itself, so TensorFlow is never imported.

Every step reproduces the package's single-image ``detect_faces`` with its defaults:

* pixels are normalised to ``(x - 127.5) / 128``;
* pyramid: ``scales = 0.6 * 0.709 ** arange(n)`` with the package's own formula for ``n``
  (``min_size=12``), each level resized with TensorFlow's ``resize_area`` semantics
  (fractional-overlap box filter, output size truncated to int);
* PNet proposals (stride 2, 12 px cell, ``score > 0.6``), NMS per level (IoU 0.5), NMS
  across levels (IoU 0.7), boxes squared;
* RNet/ONet crops with ``tf.image.crop_and_resize`` semantics (bilinear, box corners
  divided by the image size, samples outside the image are 0), box regression with the
  package's ``+1`` widths, ``score > 0.7`` / ``> 0.8``, NMS 0.7 (union, then "min");
* the package's NMS is *not* greedy NMS: a box is dropped when ANY higher-scored box of
  the same image overlaps it by more than the threshold, even one that was itself
  dropped. That rule is reproduced here;
* boxes are sorted by score exactly as the package sorts them (``np.argsort(...)[::-1]``
  over an image's rows), so even tied scores are visited in the package's order;
* final boxes clipped to ``[0, W-1] x [0, H-1]``; landmarks are not clipped.

Pyramid levels too small for PNet (under 11 px, reachable only with ``min_face_size``
above 20) are skipped; they cannot yield a box.

Unlike the package's batched mode (which pads images of different sizes to a common
canvas and uses one pyramid for all), every image is processed exactly as if it were
alone, so a batch gives the same detections as one-by-one calls (the package's batched
mode itself departs from its single-image results on a few percent of LFW images, because
it sorts the scores of the whole batch at once and breaks ties differently). Images of
equal size share PNet forward passes; RNet/ONet crops of all images go through single
passes (in chunks of ``crop_chunk``).

Every tensor is made on the detector's device. On a GPU the host waits for the device a
fixed number of times per ``detect`` call (per worker part), whatever the number of
images or pyramid levels: PNet's face cells are found once for all levels, each of the
four NMS calls reads its scores once and its kept boxes once (the package's tie order
needs numpy's own sort on the host), the results come back in one copy, and with several
image sizes each crop stage reads how many boxes each size has: 10 syncs, 12 with mixed
sizes (``tests/test_mtcnn_torch.py`` counts them with :mod:`pipeline.torch_audit`).
Copies to the device go through pinned memory without blocking.
"""
from __future__ import annotations

import importlib.util
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.cpu import available_cores

__all__ = [
    "Detection",
    "ONet",
    "PNet",
    "RNet",
    "TorchMTCNN",
    "load_package_weights",
    "package_nms",
    "package_weights_dir",
    "pyramid_scales",
    "to_package_format",
]

_MIN_SIZE = 12  # PNet cell size, the package's ``min_size``
_NMS_PNET_LEVEL = 0.5
_NMS_PNET_ALL = 0.7
_NMS_RNET = 0.7
_NMS_ONET = 0.7
_KEYPOINTS = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")


# ----------------------------------------------------------------------------- weights
def package_weights_dir() -> Path:
    """Directory holding the ``mtcnn`` package's bundled weights, found without importing it."""
    spec = importlib.util.find_spec("mtcnn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the 'mtcnn' package is not installed (needed for its weights): pip install mtcnn")
    root = Path(list(spec.submodule_search_locations)[0]) / "assets" / "weights"
    if not root.is_dir():
        raise FileNotFoundError(f"{root} does not exist; expected the mtcnn 1.0 package's bundled weights there")
    return root


def load_package_weights() -> dict[str, list[np.ndarray]]:
    """Load ``{"pnet", "rnet", "onet"}`` -> list of float32 arrays in Keras ``get_weights()`` order.

    The files are joblib pickles compressed with lz4, read with ``joblib.load`` exactly as
    ``mtcnn.utils.tensorflow.load_weights`` does.
    """
    import joblib  # a dependency of mtcnn; imported lazily

    root = package_weights_dir()
    out: dict[str, list[np.ndarray]] = {}
    for name in ("pnet", "rnet", "onet"):
        path = root / f"{name}.lz4"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; expected the mtcnn package's {name} weights")
        out[name] = [np.asarray(a, dtype=np.float32) for a in joblib.load(path)]
    return out


def _conv(w: np.ndarray, b: np.ndarray) -> nn.Conv2d:
    """Keras kernel (kh, kw, in, out) + bias (out,) -> torch Conv2d."""
    conv = nn.Conv2d(w.shape[2], w.shape[3], kernel_size=w.shape[:2])
    conv.weight.data = torch.from_numpy(w.transpose(3, 2, 0, 1).copy())
    conv.bias.data = torch.from_numpy(b.copy())
    return conv


def _linear(w: np.ndarray, b: np.ndarray) -> nn.Linear:
    """Keras dense kernel (in, out) + bias (out,) -> torch Linear."""
    lin = nn.Linear(w.shape[0], w.shape[1])
    lin.weight.data = torch.from_numpy(w.T.copy())
    lin.bias.data = torch.from_numpy(b.copy())
    return lin


def _prelu(alpha: np.ndarray) -> nn.PReLU:
    """Keras PReLU alpha ((1, 1, C) shared over H, W, or (C,)) -> torch PReLU(C)."""
    a = alpha.reshape(-1)
    p = nn.PReLU(a.shape[0])
    p.weight.data = torch.from_numpy(a.copy())
    return p


def _widen_first_conv(weights: list[np.ndarray], channels: int) -> list[np.ndarray]:
    """Pad conv1 (weights 0-2: kernel, bias, PReLU alpha) to ``channels`` outputs with zero
    filters, and conv2's kernel (weight 3) with matching zero inputs. The extra channels are
    0 throughout, so outputs are unchanged; channels-last PReLU and max-pool were measured
    faster on 16/32 channels than on the original 10/28."""
    w = list(weights)
    extra = channels - w[0].shape[3]
    w[0] = np.concatenate([w[0], np.zeros((*w[0].shape[:3], extra), np.float32)], axis=3)
    w[1] = np.concatenate([w[1], np.zeros(extra, np.float32)])
    w[2] = np.concatenate([w[2].reshape(-1), np.zeros(extra, np.float32)])
    w[3] = np.concatenate([w[3], np.zeros((*w[3].shape[:2], extra, w[3].shape[3]), np.float32)], axis=2)
    return w


# ---------------------------------------------------------------------------- networks
class PNet(nn.Module):
    """Proposal net. ``(N, 3, H, W)`` normalised pixels -> ``(reg (N, h, w, 4), prob (N, h, w, 2))``.

    ``h = ceil((H - 2) / 2) - 4`` (likewise ``w``); ``prob[..., 1]`` is the face probability,
    ``reg`` the (x1, y1, x2, y2) offsets in units of the 12 px cell.
    """

    def __init__(self, weights: list[np.ndarray]) -> None:
        super().__init__()
        w = _widen_first_conv(weights, 16)
        self.body = nn.Sequential(
            _conv(w[0], w[1]), _prelu(w[2]), nn.MaxPool2d(2, 2, ceil_mode=True),  # "same" pool
            _conv(w[3], w[4]), _prelu(w[5]),
            _conv(w[6], w[7]), _prelu(w[8]),
        )
        # both 1x1 heads fused into one per-pixel linear map: outputs 0-3 regression, 4-5 logits
        self.head = _linear(np.concatenate([w[9], w[11]], axis=3)[0, 0], np.concatenate([w[10], w[12]]))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.head(self.body(x).permute(0, 2, 3, 1))  # NHWC, like the Keras model
        return y[..., :4], torch.softmax(y[..., 4:], dim=-1)


class RNet(nn.Module):
    """Refine net. ``(N, 3, 24, 24)`` -> ``(reg (N, 4), prob (N, 2))``."""

    def __init__(self, weights: list[np.ndarray]) -> None:
        super().__init__()
        w = _widen_first_conv(weights, 32)
        self.body = nn.Sequential(
            _conv(w[0], w[1]), _prelu(w[2]), nn.MaxPool2d(3, 2, ceil_mode=True),  # "same" pool
            _conv(w[3], w[4]), _prelu(w[5]), nn.MaxPool2d(3, 2),
            _conv(w[6], w[7]), _prelu(w[8]),
        )
        self.fc = nn.Sequential(_linear(w[9], w[10]), _prelu(w[11]))
        self.head = _linear(np.concatenate([w[12], w[14]], axis=1), np.concatenate([w[13], w[15]]))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.body(x).permute(0, 3, 2, 1).flatten(1)  # Keras Permute((2,1,3)) + Flatten on NHWC
        y = self.head(self.fc(x))
        return y[:, :4], torch.softmax(y[:, 4:], dim=1)


class ONet(nn.Module):
    """Output net. ``(N, 3, 48, 48)`` -> ``(reg (N, 4), landmarks (N, 10), prob (N, 2))``.

    ``landmarks`` are x1..x5 then y1..y5, as fractions of the input box.
    """

    def __init__(self, weights: list[np.ndarray]) -> None:
        super().__init__()
        w = weights
        self.body = nn.Sequential(
            _conv(w[0], w[1]), _prelu(w[2]), nn.MaxPool2d(3, 2, ceil_mode=True),  # "same" pool
            _conv(w[3], w[4]), _prelu(w[5]), nn.MaxPool2d(3, 2),
            _conv(w[6], w[7]), _prelu(w[8]), nn.MaxPool2d(2, 2, ceil_mode=True),  # "same" pool
            _conv(w[9], w[10]), _prelu(w[11]),
        )
        self.fc = nn.Sequential(_linear(w[12], w[13]), _prelu(w[14]))
        self.head = _linear(np.concatenate([w[15], w[17], w[19]], axis=1), np.concatenate([w[16], w[18], w[20]]))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.body(x).permute(0, 3, 2, 1).flatten(1)
        y = self.head(self.fc(x))
        return y[:, :4], y[:, 4:14], torch.softmax(y[:, 14:], dim=1)


# ------------------------------------------------------------------- geometry helpers
def pyramid_scales(height: int, width: int, min_face_size: int, scale_factor: float) -> np.ndarray:
    """The package's ``build_scale_pyramid``: float64 scales, possibly empty for tiny images."""
    min_dim = min(width, height)
    if min_dim < _MIN_SIZE:  # the formula gives a negative count there (and fails on 0)
        return np.zeros(0)
    count = round(-((np.log(min_dim / _MIN_SIZE) / np.log(scale_factor)) + 1))
    return (_MIN_SIZE / min_face_size) * scale_factor ** np.arange(max(count, 0))


def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` float32 weights of TensorFlow's ``resize_area`` along one axis.

    Output cell ``o`` covers input span ``[o * s, (o + 1) * s)`` with ``s = n_in / n_out``;
    each input pixel weighs its overlap with that span, divided by ``s``.
    """
    s = np.float32(n_in) / np.float32(n_out)
    lo = np.arange(n_out, dtype=np.float32) * s
    hi = np.arange(1, n_out + 1, dtype=np.float32) * s
    pix = np.arange(n_in, dtype=np.float32)
    overlap = np.minimum(pix[None, :] + 1, hi[:, None]) - np.maximum(pix[None, :], lo[:, None])
    return (np.clip(overlap, 0, None) / s).astype(np.float32)


def _iou_padded(a: torch.Tensor, b: torch.Tensor, method: str) -> torch.Tensor:
    """Overlap of ``(G, R, 4)`` with ``(G, K, 4)`` x1y1x2y2 boxes -> ``(G, R, K)``, the package's formula
    ("union": intersection / union, "min": intersection / smaller area; 0/0 gives NaN)."""
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    lt = torch.maximum(a[:, :, None, :2], b[:, None, :, :2])
    rb = torch.minimum(a[:, :, None, 2:], b[:, None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    if method == "union":
        return inter / (area_a[:, :, None] + area_b[:, None, :] - inter)
    return inter / torch.minimum(area_a[:, :, None], area_b[:, None, :])


def _package_order(scores: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Groups ascending; inside a group ``np.argsort(scores)[::-1]`` over the group's rows in
    their given order -- the package's ``sort_by_scores``, including how it orders ties."""
    by_group = np.argsort(groups, kind="stable")
    bounds = np.flatnonzero(np.diff(groups[by_group])) + 1
    return np.concatenate([idx[np.argsort(scores[idx])[::-1]] for idx in np.split(by_group, bounds)])


def _upload(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on ``device``. To a GPU the copy goes through pinned memory without
    blocking, so it does not wait for the queued kernels (a copy from ordinary, pageable
    memory does); on the CPU the array's memory is used as it is."""
    t = torch.from_numpy(array)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def package_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, threshold: float,
                method: str = "union", max_elems: int = 1 << 20, *, min_score: float | None = None) -> torch.Tensor:
    """The package's NMS, per group (image): keep a box iff no higher-scored box of its group
    overlaps it by more than ``threshold`` (suppressed boxes still suppress).

    boxes ``(N, 4)`` x1y1x2y2 float64, scores ``(N,)`` float64, groups ``(N,)`` int64 (below
    2**53), rows of a group in the package's row order. With ``min_score``, only rows with
    ``score > min_score`` take part (the stages' score threshold, applied first). Returns
    indices into the inputs, ordered by group then descending score (ties ordered as the
    package orders them).

    Host round trips, whatever the number of groups: scores and groups come to the host in
    one copy (the package's tie order needs numpy's own sort), the order and the group
    layout go back in one copy, and the kept indices are read off once. The overlaps are
    computed on the device for blocks of groups of similar size (largest first; a block
    holds groups of at least 0.7 times its largest), so many small groups beside a big one
    are not padded to its size.
    """
    device = boxes.device
    empty = torch.zeros(0, dtype=torch.long, device=device)
    if boxes.shape[0] == 0:
        return empty
    host = torch.stack([scores.double(), groups.double()]).cpu().numpy()
    rows = np.arange(host.shape[1])
    if min_score is not None:
        rows = np.flatnonzero(host[0] > min_score)
        if rows.size == 0:
            return empty
    order = rows[_package_order(host[0, rows], host[1, rows].astype(np.int64))]
    g = host[1, order]
    first = np.r_[True, g[1:] != g[:-1]]  # a group's first row in ``order``
    starts = np.flatnonzero(first)
    counts = np.diff(np.r_[starts, g.size])
    group_of_row = np.cumsum(first) - 1
    pos = np.arange(g.size) - starts[group_of_row]  # row within its group
    # slot of each group: groups by descending size (ties in group order)
    by_size = np.argsort(-counts, kind="stable")
    slot = np.empty_like(by_size)
    slot[by_size] = np.arange(by_size.size)
    sizes = counts[by_size]
    k = int(sizes[0])
    layout = _upload(np.stack([order, slot[group_of_row], pos]), device)
    order_t, slot_t, pos_t = layout[0], layout[1], layout[2]
    padded = boxes.new_zeros(sizes.size, k, 4)  # padding boxes have zero area -> NaN IoU -> never suppress
    padded[slot_t, pos_t] = boxes[order_t]
    later = torch.triu(torch.ones(k, k, dtype=torch.bool, device=device), diagonal=1)  # [i, j]: i < j
    suppressed = torch.zeros(sizes.size, k, dtype=torch.bool, device=device)
    c = 0
    while c < sizes.size:
        kb = int(sizes[c])  # the largest group of this block; the block ends before groups under 0.7 kb
        similar = int(np.searchsorted(-sizes[c:], -0.7 * kb, side="right"))  # (padding <= 2x the work)
        step = max(1, min(similar, max_elems // (kb * kb)))  # groups per block
        block = slice(c, c + step)
        rows_per = max(1, min(kb, max_elems // kb))  # suppressor rows per pass (when one group is too big)
        for r in range(0, kb, rows_per):
            iou = _iou_padded(padded[block, r:r + rows_per], padded[block, :kb], method)
            suppressed[block, :kb] |= ((iou > threshold) & later[r:r + rows_per, :kb]).any(dim=1)
        c += step
    return order_t[~suppressed[slot_t, pos_t]]


def _square(b: torch.Tensor) -> torch.Tensor:
    """``resize_to_square`` on ``(N, 4)`` x1y1x2y2: grow the short side about the centre."""
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    side = torch.maximum(w, h)
    x1 = b[:, 0] + w * 0.5 - side * 0.5
    y1 = b[:, 1] + h * 0.5 - side * 0.5
    return torch.stack([x1, y1, x1 + side, y1 + side], dim=1)


def _regress(b: torch.Tensor, reg: torch.Tensor) -> torch.Tensor:
    """``adjust_bboxes``: add ``reg * (w + 1, h + 1, w + 1, h + 1)`` to ``(N, 4)`` x1y1x2y2."""
    w = b[:, 2] - b[:, 0] + 1
    h = b[:, 3] - b[:, 1] + 1
    return b + reg.double() * torch.stack([w, h, w, h], dim=1)


# ------------------------------------------------------------------------- public API
@dataclass(frozen=True, eq=False)
class Detection:
    """One face.

    box: (x, y, w, h) in pixels of the input image (x, y = top-left corner), clipped to it.
    confidence: ONet face probability in (0, 1].
    landmarks: (5, 2) float64 (x, y) pixels: left_eye, right_eye, nose, mouth_left,
        mouth_right (the package's ``keypoints``; not clipped to the image).
    """

    box: tuple[float, float, float, float]
    confidence: float
    landmarks: np.ndarray


def to_package_format(det: Detection) -> dict:
    """The dict ``mtcnn.MTCNN().detect_faces`` returns for this face (box/keypoints rounded to int)."""
    x, y, w, h = (int(v) for v in np.round(np.asarray(det.box, dtype=np.float64)).astype(int))
    lm = np.round(det.landmarks).astype(int)
    kp = {name: [int(lm[i, 0]), int(lm[i, 1])] for i, name in enumerate(_KEYPOINTS)}
    return {
        "box": [x, y, w, h],
        "confidence": float(det.confidence),
        "keypoints": {k: kp[k] for k in ("nose", "mouth_right", "right_eye", "left_eye", "mouth_left")},
    }


def _split_balanced(weights: list[int], parts: int) -> list[tuple[int, int]]:
    """Cut ``range(len(weights))`` into at most ``parts`` contiguous non-empty slices of similar total weight."""
    parts = max(1, min(parts, len(weights)))
    cum = np.cumsum(weights, dtype=np.float64)
    cuts = [0]
    for p in range(1, parts):
        cut = int(np.searchsorted(cum, cum[-1] * p / parts)) + 1
        cuts.append(min(max(cut, cuts[-1] + 1), len(weights) - (parts - p)))
    cuts.append(len(weights))
    return [(a, b) for a, b in zip(cuts[:-1], cuts[1:])]


def _check_image(img: object, k: int) -> np.ndarray:
    if not isinstance(img, np.ndarray):
        raise TypeError(f"images[{k}] is a {type(img).__name__}; expected an HxWx3 uint8 RGB numpy array")
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"images[{k}] has shape {img.shape}; expected (H, W, 3) RGB")
    if img.dtype != np.uint8:
        raise ValueError(f"images[{k}] has dtype {img.dtype}; expected uint8")
    return img


class TorchMTCNN:
    """MTCNN face + 5-landmark detector, numerically equivalent to ``mtcnn.MTCNN().detect_faces``.

    min_face_size: smallest face side in pixels (the package's ``min_face_size``).
    scale_factor: pyramid step in (0, 1).
    thresholds: (PNet, RNet, ONet) face-probability thresholds, each in [0, 1).
    device: torch device string ("cpu", "cuda", ...).
    num_threads: CPU cores to use; ``None`` = every core available to this process. On CPU
        a batch is split into ``num_threads`` contiguous parts run by as many worker threads,
        each with one torch intra-op thread (``torch.set_num_threads(1)`` for the duration
        of ``detect``, restored afterwards): that keeps every core busy without OpenMP
        barriers, which collapse when the machine is shared. On other devices it is the
        torch intra-op thread count.
    pnet_max_pixels / pnet_chunk_elems / crop_chunk: memory knobs (pixels per stacked group,
        PNet activation elements per forward, crops per RNet/ONet forward); results do not
        depend on them.
    """

    def __init__(self, *, min_face_size: int = 20, scale_factor: float = 0.709,
                 thresholds: tuple[float, float, float] = (0.6, 0.7, 0.8),
                 device: str = "cpu", num_threads: int | None = None,
                 pnet_max_pixels: int = 1 << 21, pnet_chunk_elems: int = 1 << 21,
                 crop_chunk: int = 256) -> None:
        if isinstance(min_face_size, bool) or not isinstance(min_face_size, (int, np.integer)) or min_face_size < 1:
            raise ValueError(f"min_face_size={min_face_size!r}; expected a positive int (pixels)")
        if not 0.0 < float(scale_factor) < 1.0:
            raise ValueError(f"scale_factor={scale_factor!r}; expected a float in (0, 1)")
        if len(thresholds) != 3 or not all(0.0 <= float(t) < 1.0 for t in thresholds):
            raise ValueError(f"thresholds={thresholds!r}; expected three floats in [0, 1) for PNet, RNet, ONet")
        if num_threads is not None and (isinstance(num_threads, bool) or int(num_threads) < 1):
            raise ValueError(f"num_threads={num_threads!r}; expected a positive int or None")
        for name, val in (("pnet_max_pixels", pnet_max_pixels), ("pnet_chunk_elems", pnet_chunk_elems),
                          ("crop_chunk", crop_chunk)):
            if int(val) < 1:
                raise ValueError(f"{name}={val!r}; expected a positive int")
        self.min_face_size = int(min_face_size)
        self.scale_factor = float(scale_factor)
        self.thresholds = tuple(float(t) for t in thresholds)
        try:
            self.device = torch.device(device)
        except RuntimeError as exc:
            raise ValueError(f"device={device!r} is not a torch device (e.g. 'cpu', 'cuda')") from exc
        if num_threads is None:
            num_threads = available_cores()
        self.num_threads = int(num_threads)
        self._workers = self.num_threads if self.device.type == "cpu" else 1
        self._pool = ThreadPoolExecutor(self._workers) if self._workers > 1 else None
        self.pnet_max_pixels = int(pnet_max_pixels)
        self.pnet_chunk_elems = int(pnet_chunk_elems)
        self.crop_chunk = int(crop_chunk)
        w = load_package_weights()
        cl = torch.channels_last  # faster convolutions on CPU; inputs are built channels-last
        self.pnet = PNet(w["pnet"]).to(self.device, memory_format=cl).eval()
        self.rnet = RNet(w["rnet"]).to(self.device, memory_format=cl).eval()
        self.onet = ONet(w["onet"]).to(self.device, memory_format=cl).eval()
        self._area_cache: dict[tuple[int, int], torch.Tensor] = {}

    # -- public
    def detect(self, images: list[np.ndarray]) -> list[list[Detection]]:
        """Detect faces in each HxWx3 uint8 RGB image; one list per image, by descending confidence.

        Each image gets the detections it would get alone: batching never changes results
        (beyond float rounding in the convolutions).
        """
        if not isinstance(images, (list, tuple)):
            raise TypeError(f"images is a {type(images).__name__}; expected a list of HxWx3 uint8 numpy arrays")
        images = [_check_image(img, k) for k, img in enumerate(images)]
        if not images:
            return []
        parts = _split_balanced([img.shape[0] * img.shape[1] for img in images], self._workers)
        previous = torch.get_num_threads()
        torch.set_num_threads(1 if self._workers > 1 else self.num_threads)
        try:
            if len(parts) == 1:
                return self._detect_serial(images)
            chunks = self._pool.map(self._detect_serial, [images[a:b] for a, b in parts])
            return [dets for chunk in chunks for dets in chunk]
        finally:
            torch.set_num_threads(previous)

    @torch.inference_mode()
    def _detect_serial(self, images: list[np.ndarray]) -> list[list[Detection]]:
        sizes = _upload(np.array([img.shape[:2] for img in images], dtype=np.int64), self.device)
        batches, place = self._batches(images)
        boxes, ids, scores = self._stage_pnet(batches, len(images))
        if ids.numel():
            boxes, ids, scores = self._stage_rnet(batches, place, boxes, ids)
        landmarks = boxes.new_zeros(0, 10)
        if ids.numel():
            boxes, ids, scores, landmarks = self._stage_onet(batches, place, boxes, ids)
        return self._to_detections(len(images), sizes, boxes, ids, scores, landmarks)

    # -- stages
    def _batches(self, images: list[np.ndarray]) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """Same-size images stacked: ``[(ids (G,), pixels (G, H, W, 3) float32 normalised), ...]``,
        and ``place`` ``(2, len(images))``: for image id ``k``, ``place[0, k]`` is the index of
        its batch in that list and ``place[1, k]`` its row in the batch.

        ``place`` covers every image, including those that will have no candidate left at a
        later stage, so the crop stages can map any surviving box to its pixels.

        Each pixel tensor is a view on a buffer with ``W + 1`` spare zero pixels after it, so
        that the crop sampler may read one pixel right of / one row below any pixel.
        """
        groups: dict[tuple[int, int], list[int]] = {}
        for k, img in enumerate(images):
            groups.setdefault(img.shape[:2], []).append(k)
        out = []
        place = np.zeros((2, len(images)), dtype=np.int64)
        for (h, w), members in groups.items():
            step = max(1, self.pnet_max_pixels // max(h * w, 1))
            for c in range(0, len(members), step):
                idx = members[c:c + step]
                place[0, idx] = len(out)
                place[1, idx] = np.arange(len(idx))
                n = len(idx) * h * w * 3
                buf = torch.zeros(n + (w + 1) * 3, dtype=torch.float32, device=self.device)
                pix = _upload(np.stack([images[k] for k in idx]), self.device)
                x = buf[:n].view(len(idx), h, w, 3)
                x.copy_(pix).sub_(127.5).div_(128.0)
                out.append((_upload(np.array(idx, dtype=np.int64), self.device), x))
        return out, _upload(place, self.device)

    def _area(self, n_in: int, n_out: int) -> torch.Tensor:
        """Cached sparse ``(n_out, n_in)`` TF-area resize matrix."""
        key = (n_in, n_out)
        if key not in self._area_cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
                dense = torch.from_numpy(_area_matrix(n_in, n_out)).to(self.device)
                self._area_cache[key] = dense.to_sparse_csr()
        return self._area_cache[key]

    def _resize_area(self, xt: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
        """TF ``resize_area``: ``xt`` is ``(W, H, G, 3)`` -> ``(G, 3, out_h, out_w)`` channels-last.

        Two sparse matmuls (the area matrices have ~``in/out + 1`` non-zeros per row).
        """
        w, h, g, c = xt.shape
        y = self._area(w, out_w) @ xt.reshape(w, h * g * c)  # (ow, H*G*C)
        y = y.view(out_w, h, g * c).transpose(0, 1).reshape(h, out_w * g * c)
        z = self._area(h, out_h) @ y  # (oh, ow*G*C)
        return z.view(out_h, out_w, g, c).permute(2, 0, 1, 3).contiguous().permute(0, 3, 1, 2)

    def _stage_pnet(self, batches, n_images: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Proposals: ``(N, 4)`` float64 square x1y1x2y2 boxes, ``(N,)`` image ids, ``(N,)`` scores.

        PNet runs on every pyramid level of every batch first; the face cells of all those
        maps are then found with one ``nonzero``, and the per-level NMS of all of them is one
        call whose groups are (map, image), in the order the maps were made. The host thus
        waits on the device a fixed number of times per call, not several times per level.
        """
        thr = self.thresholds[0]
        empty = (torch.zeros(0, 4, dtype=torch.float64, device=self.device),
                 torch.zeros(0, dtype=torch.long, device=self.device),
                 torch.zeros(0, dtype=torch.float64, device=self.device))
        scores, regs, map_ids = [], [], []
        maps = []  # per map (batch x level): first flat index, cells per image, map width, ids start; and scale
        cells = n_ids = 0
        for ids_t, x in batches:
            h, w = x.shape[1:3]
            xt = x.permute(2, 1, 0, 3).contiguous()  # (W, H, G, 3) for the resize
            for s in pyramid_scales(h, w, self.min_face_size, self.scale_factor):
                oh, ow = int(h * s), int(w * s)  # TF truncates the float size
                if min(oh, ow) < 11:  # PNet output would be empty
                    continue
                level = self._resize_area(xt, oh, ow)
                step = max(1, self.pnet_chunk_elems // (16 * oh * ow))  # keep activations cache-sized
                outs = [self.pnet(level[c:c + step]) for c in range(0, level.shape[0], step)]
                reg, prob = (torch.cat(t) for t in zip(*outs)) if len(outs) > 1 else outs[0]
                g, ph, pw = prob.shape[:3]
                scores.append(prob[..., 1].reshape(-1))
                regs.append(reg.reshape(-1, 4))
                map_ids.append(ids_t)
                maps.append((cells, ph * pw, pw, n_ids, float(s)))
                cells += g * ph * pw
                n_ids += g
        if not maps:
            return empty
        score = torch.cat(scores)
        flat = torch.nonzero(score > thr).squeeze(1)  # (map, image, y, x) order, as per-map nonzero would give
        if flat.numel() == 0:
            return empty
        table = _upload(np.array([m[:4] for m in maps], dtype=np.int64).T.copy(), self.device)
        scale = _upload(np.array([m[4] for m in maps], dtype=np.float64), self.device)
        which = torch.searchsorted(table[0], flat, right=True) - 1  # map of each face cell
        local = flat - table[0][which]
        per_image, width = table[1][which], table[2][which]
        g = local // per_image
        yy = (local - g * per_image) // width
        xx = local - g * per_image - yy * width
        ids = torch.cat(map_ids)[table[3][which] + g]
        r = torch.cat(regs)[flat].double() * 11.0
        x0, y0 = (2 * xx + 1).double(), (2 * yy + 1).double()
        b = torch.stack([x0 + r[:, 0], y0 + r[:, 1], x0 + 11 + r[:, 2], y0 + 11 + r[:, 3]], 1) / scale[which][:, None]
        sc = score[flat].double()
        keep = package_nms(b, sc, which * n_images + ids, _NMS_PNET_LEVEL, "union")  # per map and image
        boxes, ids, scores = b[keep], ids[keep], sc[keep]
        keep = package_nms(boxes, scores, ids, _NMS_PNET_ALL, "union")
        return _square(boxes[keep]), ids[keep], scores[keep]

    @staticmethod
    def _crops(x: torch.Tensor, boxes: torch.Tensor, local: torch.Tensor, size: int) -> torch.Tensor:
        """``tf.image.crop_and_resize`` of boxes from same-size images ``x`` ``(G, H, W, 3)``.

        boxes ``(N, 4)`` x1y1x2y2 pixels, local ``(N,)`` index into ``x``. Returns
        ``(N, 3, size, size)`` channels-last. As in the package, corners are divided by H, W
        (float32), sampled at ``y1n * (H - 1) + i * (y2n - y1n) * (H - 1) / (size - 1)``;
        bilinear; samples outside ``[0, H-1] x [0, W-1]`` are 0. ``x`` must be followed in
        memory by ``W + 1`` readable pixels (see ``_batches``).
        """
        g, h, w, _ = x.shape
        norm = torch.stack([boxes[:, 0] / w, boxes[:, 1] / h, boxes[:, 2] / w, boxes[:, 3] / h], 1).float()
        t = torch.arange(size, dtype=torch.float32, device=x.device)[None, :]
        ys = norm[:, 1:2] * (h - 1) + t * ((norm[:, 3:4] - norm[:, 1:2]) * (h - 1) / (size - 1))
        xs = norm[:, 0:1] * (w - 1) + t * ((norm[:, 2:3] - norm[:, 0:1]) * (w - 1) / (size - 1))
        valid = ((ys >= 0) & (ys <= h - 1))[:, :, None] & ((xs >= 0) & (xs <= w - 1))[:, None, :]
        y0f, x0f = ys.floor(), xs.floor()
        y0 = y0f.long().clamp(0, h - 1)
        x0 = x0f.long().clamp(0, w - 1)
        # pixel pairs (x0, x0 + 1) as 6-float rows; the right pixel is weighted 0 where TF's
        # ceil(x) == floor(x), likewise the lower row
        rows = x.as_strided((g * h * w + w, 6), (3, 1))  # reaches into the spare tail
        top = ((local * h)[:, None] + y0) * w  # (N, size) index of pixel (y0, 0)
        idx = (top[:, :, None] + x0[:, None, :]).reshape(-1)
        upper = rows.index_select(0, idx)
        lower = rows.index_select(0, idx + w)
        lx = (xs - x0f)[:, None, :].expand(-1, size, -1).reshape(-1, 1)
        ly = (ys - y0f)[:, :, None].expand(-1, -1, size).reshape(-1, 1)
        a = torch.lerp(upper[:, :3], upper[:, 3:], lx)
        b = torch.lerp(lower[:, :3], lower[:, 3:], lx)
        out = torch.lerp(a, b, ly).view(-1, size, size, 3) * valid[..., None]
        return out.permute(0, 3, 1, 2)  # (N, size, size, 3) memory = channels-last

    def _forward_crops(self, net: nn.Module, batches, place: torch.Tensor, boxes: torch.Tensor,
                       ids: torch.Tensor, size: int):
        """Run ``net`` on the ``size`` x ``size`` crops of every box; outputs in the order of ``boxes``.

        ``place`` (from :meth:`_batches`) maps each box's image id to its batch and row.
        """
        n = boxes.shape[0]
        if len(batches) == 1:  # one image size: no sorting of boxes by batch needed
            crops = self._crops(batches[0][1], boxes, place[1, ids], size)
        else:
            crops = torch.empty(n, size, size, 3, device=self.device).permute(0, 3, 1, 2)
            batch_of = place[0, ids]
            order = torch.argsort(batch_of, stable=True)
            counts = torch.zeros(len(batches), dtype=torch.long, device=self.device)
            counts = counts.index_add_(0, batch_of, torch.ones_like(batch_of)).tolist()  # the one host sync
            start = 0
            for (_, x), count in zip(batches, counts):
                if count:
                    sel = order[start:start + count]
                    crops[sel] = self._crops(x, boxes[sel], place[1, ids[sel]], size)
                start += count
        outs = [net(crops[c:c + self.crop_chunk]) for c in range(0, n, self.crop_chunk)]
        return [torch.cat(parts) for parts in zip(*outs)]

    def _stage_rnet(self, batches, place, boxes, ids):
        reg, prob = self._forward_crops(self.rnet, batches, place, boxes, ids, 24)
        scores = prob[:, 1].double()
        boxes = _regress(boxes, reg)
        keep = package_nms(boxes, scores, ids, _NMS_RNET, "union", min_score=self.thresholds[1])
        return _square(boxes[keep]), ids[keep], scores[keep]

    def _stage_onet(self, batches, place, boxes, ids):
        reg, lm, prob = self._forward_crops(self.onet, batches, place, boxes, ids, 48)
        scores = prob[:, 1].double()
        w = (boxes[:, 2] - boxes[:, 0] + 1)[:, None]
        h = (boxes[:, 3] - boxes[:, 1] + 1)[:, None]
        lm = lm.double()
        landmarks = torch.cat([w * lm[:, :5] + boxes[:, 0:1] - 1, h * lm[:, 5:] + boxes[:, 1:2] - 1], dim=1)
        boxes = _regress(boxes, reg)
        keep = package_nms(boxes, scores, ids, _NMS_ONET, "min", min_score=self.thresholds[2])
        return boxes[keep], ids[keep], scores[keep], landmarks[keep]

    def _to_detections(self, n: int, sizes, boxes, ids, scores, landmarks) -> list[list[Detection]]:
        out: list[list[Detection]] = [[] for _ in range(n)]
        if ids.numel() == 0:
            return out
        hw = sizes[ids].double()
        lim = torch.stack([hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]], 1) - 1
        boxes = torch.minimum(boxes.clamp(min=0), lim)  # the package's limit_bboxes
        host = torch.cat([boxes, ids[:, None].double(), scores[:, None], landmarks], 1).cpu().numpy()  # one copy
        b, i, s, lm = host[:, :4], host[:, 4], host[:, 5], host[:, 6:]
        for k in range(b.shape[0]):
            x1, y1, x2, y2 = (float(v) for v in b[k])
            out[int(i[k])].append(Detection(box=(x1, y1, x2 - x1, y2 - y1), confidence=float(s[k]),
                                            landmarks=np.stack([lm[k, :5], lm[k, 5:]], axis=1)))
        return out
