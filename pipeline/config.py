"""Load and validate ``params.yaml``.

The whole file is checked against a typed schema before any stage does work, so a
typo or an out-of-range value fails fast with one line that names the key, the bad
value and what is allowed (:class:`ConfigError`; the CLI exits with status 2).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_PARAMS = Path("params.yaml")

#: Loss names whose params live in a section other than ``losses.<name>``. ArcFace
#: is the headline loss, so its section is the short ``loss`` (``-S loss.margin=0.8``).
SPECIAL_SECTIONS = {"arcface": "loss"}


#: Dataset kinds whose images are aligned faces already (never detected nor warped).
PREALIGNED_KINDS = ("insightface_rec", "insightface_bin")


class ConfigError(ValueError):
    """A params file that cannot be used; the message is one line for the user."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SyntheticParams(_Strict):
    """Sizes of the built-in synthetic face dataset (see ``pipeline.datasets.synthetic``)."""

    train_identities: int = Field(80, ge=2)
    train_images_per_identity: int = Field(20, ge=2)
    closed_images_per_identity: int = Field(4, ge=2)
    open_identities: int = Field(50, ge=2)
    domain_identities: int = Field(50, ge=2)
    test_images_per_identity: int = Field(6, ge=2)
    image_size: int = Field(160, ge=64, le=1024)
    folds: int = Field(10, ge=1)
    pairs_per_fold: int = Field(60, ge=2)


class DatasetSpec(_Strict):
    """One dataset: where it is and how it is laid out.

    kinds:
      synthetic  one of the built-in sets (``set``: train, synth_open, synth_closed, synth_domain)
      folder     ``path``/<identity>/<image>; every image, no pairs (training sets)
      lfw        ``path``/<identity>/<identity>_NNNN.jpg plus an official ``pairs`` file
      pairs_csv  ``path`` is a CSV of (path1, path2, same[, fold]); relative image paths
                 are resolved against ``root`` (default: the CSV's folder); without a fold
                 column, folds are stratified by label, seeded by the top-level ``seed``
      insightface_rec  ``path`` is a folder with insightface's ``train.rec``, ``train.idx`` and
                 ``property`` (e.g. ``faces_webface_112x112``): pre-aligned 112 x 112 faces read
                 straight from the RecordIO file (training sets)
      insightface_bin  ``path`` is an insightface verification ``.bin`` (lfw.bin, cfp_fp.bin,
                 agedb_30.bin, ...): pre-aligned faces, pairs 2i / 2i + 1, ten folds in order

    The two insightface kinds are pre-aligned: ``precropped`` is implied (``crop: resize``).
    ``detect``: overrides of the ``detect`` params for this set only (e.g. ``{min_face_size: 40}``);
    changing them reruns this set's stages only.

    ``precropped: true`` (any kind): the images are face crops already; detect and align skip
    MTCNN and the 5-point warp and resize each image to ``align.size`` (``crop: resize``), or
    cut its central square of ``crop_fraction`` times the shorter side and resize that
    (``crop: center``). The report's detection and alignment figures say so for the set.
    """

    kind: Literal["synthetic", "folder", "lfw", "pairs_csv", "insightface_rec", "insightface_bin"]
    set: str | None = None
    path: str | None = None
    pairs: str | None = None
    root: str | None = None
    folds: list[int] | None = None
    min_images_per_identity: int = Field(1, ge=1)
    exclude_identities_of: list[str] = Field(default_factory=list)
    download: bool = False
    # Pre-cropped faces (e.g. 256x256 crops): no MTCNN, no landmark alignment; each image is
    # resized to align.size (`crop: resize`), or its central square (side crop_fraction x the
    # shorter side) is cut out and resized (`crop: center`).
    precropped: bool = False
    crop: Literal["resize", "center"] = "resize"
    crop_fraction: float = Field(1.0, gt=0.0, le=1.0)
    detect: dict[str, Any] = Field(default_factory=dict)
    # training set only: this fraction of its images given a wrong identity (seeded by seeds.data),
    # as in the ArcFace study's noisy-label experiment
    label_noise: float = Field(0.0, ge=0.0, lt=1.0)

    @model_validator(mode="before")
    @classmethod
    def _prealigned(cls, values: Any) -> Any:
        if isinstance(values, dict) and values.get("kind") in PREALIGNED_KINDS:
            if values.get("precropped") is False:
                raise ValueError(f"a {values['kind']} set holds aligned faces already: `precropped` cannot be false")
            values = {**values, "precropped": True}
        return values

    @field_validator("detect")
    @classmethod
    def _detect_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(value) - set(DetectParams.model_fields))
        if unknown:
            raise ValueError(f"detect.{unknown[0]}: unknown detect key (known: {', '.join(DetectParams.model_fields)})")
        DetectParams.model_validate(value)  # each value checked as in the detect section
        return value

    @model_validator(mode="after")
    def _fields_for_kind(self) -> "DatasetSpec":
        if self.kind == "synthetic":
            if self.set is None:
                raise ValueError("a synthetic dataset needs `set` (train, synth_open, synth_closed or synth_domain)")
        elif self.path is None:
            raise ValueError(f"a {self.kind} dataset needs `path`")
        if not self.precropped and (self.crop != "resize" or self.crop_fraction != 1.0):
            raise ValueError("`crop` and `crop_fraction` apply to pre-cropped sets only; add `precropped: true`")
        if self.crop == "resize" and self.crop_fraction != 1.0:
            raise ValueError("`crop_fraction` applies to `crop: center` only")
        if self.detect and self.precropped:
            raise ValueError("`detect` overrides do not apply to a pre-cropped set (it is not detected)")
        return self


class DataParams(_Strict):
    train: DatasetSpec
    tests: dict[str, DatasetSpec]
    synthetic: SyntheticParams = SyntheticParams()

    @field_validator("tests")
    @classmethod
    def _names(cls, tests: dict[str, DatasetSpec]) -> dict[str, DatasetSpec]:
        if not tests:
            raise ValueError("at least one test set is needed")
        for name, spec in tests.items():
            if spec.label_noise:
                raise ValueError(f"{name}.label_noise: only the training set takes label noise")
        for name in tests:
            if (not name.replace("_", "").replace("-", "").isalnum() or name in RESERVED_SET_NAMES
                    or name.startswith("_")):
                raise ValueError(f"test set name {name!r} must be letters, digits, '_' or '-', not start with '_' "
                                 f"(the embed stage's own files do), and be none of {', '.join(RESERVED_SET_NAMES)}")
        return tests


class DetectParams(_Strict):
    backend: Literal["torch", "package"] = "torch"
    min_face_size: int = Field(20, ge=8)
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.8)
    scale_factor: float = Field(0.709, gt=0.1, lt=1.0)
    min_confidence: float = Field(0.9, ge=0.0, le=1.0)
    batch_size: int = Field(32, ge=1)
    max_image_side: int = Field(2000, ge=64)
    min_image_side: int = Field(24, ge=12)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # torch backend; auto = cuda when PyTorch sees a GPU
    # Images per resumable chunk (rounded up to whole batches): a killed run keeps its finished chunks.
    chunk_size: int = Field(2000, ge=1)

    @field_validator("thresholds")
    @classmethod
    def _unit(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if not all(0.0 <= t <= 1.0 for t in value):
            raise ValueError("each MTCNN stage threshold must be in [0, 1]")
        return value


class AlignParams(_Strict):
    size: int = Field(112, ge=32, le=512)
    jpeg_quality: int = Field(95, ge=50, le=100)
    contact_sheet: int = Field(48, ge=0, le=400)
    chunk_size: int = Field(2000, ge=1)  # faces per resumable chunk, and per packed part file of the output


class ShardParams(_Strict):
    format: Literal["parquet", "webdataset", "both"] = "parquet"
    images_per_shard: int = Field(4096, ge=1)


class ModelParams(_Strict):
    backbone: str = "smallcnn"
    embedding_size: int = Field(128, ge=2, le=4096)
    head: str = "bn_dropout_fc_bn"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    grayscale: bool = False


class AugmentParams(_Strict):
    """Training-time augmentation (``train.augment``), applied on the training device, each draw
    seeded by the training seed and the epoch (see :mod:`pipeline.augment`). Everything but the
    horizontal flip is off by default; with those defaults training is bit-identical to the
    trainer before augmentation existed. The old key ``train.flip`` is read as ``train.augment.flip``.
    """

    flip: bool = True  # mirror each image with probability 1/2
    # random resized crop: area fraction of the crop, drawn uniformly in [low, high]; [1, 1] = off
    crop_area: tuple[float, float] = (1.0, 1.0)
    # aspect ratio (width / height) of the crop, drawn log-uniformly (only with the crop on)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    # zoom about the crop centre by a factor in [1 - j, 1 + j] (< 1 shrinks the face, black border); 0 = off
    scale_jitter: float = Field(0.0, ge=0.0, lt=1.0)
    brightness: float = Field(0.0, ge=0.0, lt=1.0)  # pixel values x f, f in [1 - b, 1 + b]
    contrast: float = Field(0.0, ge=0.0, lt=1.0)    # about the image's mean grey, factor in [1 - c, 1 + c]
    saturation: float = Field(0.0, ge=0.0, lt=1.0)  # about each pixel's grey, factor in [1 - s, 1 + s]
    # white balance: red x (1 + k), blue x (1 - k), k in [-t, t] (k > 0 warmer, k < 0 cooler)
    temperature: float = Field(0.0, ge=0.0, lt=1.0)
    grayscale: float = Field(0.0, ge=0.0, le=1.0)  # probability that an image is turned grey

    @field_validator("crop_area")
    @classmethod
    def _area(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0.0 < low <= high <= 1.0:
            raise ValueError("expected [low, high] with 0 < low <= high <= 1 (area fractions; [1, 1] = no crop)")
        return value

    @field_validator("crop_ratio")
    @classmethod
    def _ratio(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0.0 < low <= high:
            raise ValueError("expected [low, high] with 0 < low <= high (width / height of the crop)")
        return value

    def active(self) -> list[str]:
        """Names of the augmentations that draw random numbers besides the flip, in the order applied."""
        on = {"crop": self.crop_area != (1.0, 1.0), "scale_jitter": self.scale_jitter > 0,
              "brightness": self.brightness > 0, "contrast": self.contrast > 0, "saturation": self.saturation > 0,
              "temperature": self.temperature > 0, "grayscale": self.grayscale > 0}
        return [name for name, is_on in on.items() if is_on]


def _move_legacy_flip(values: dict[str, Any]) -> dict[str, Any]:
    """``train.flip`` (the key before ``train.augment`` existed) -> ``train.augment.flip``.

    ValueError when both are given and disagree."""
    if "flip" not in values:
        return values
    values = dict(values)
    flip = values.pop("flip")
    augment = values.get("augment") or {}
    augment = augment.model_dump() if isinstance(augment, BaseModel) else dict(augment)
    if "flip" in augment and augment["flip"] != flip:
        raise ValueError(f"train.flip = {flip!r} and train.augment.flip = {augment['flip']!r} disagree; "
                         "train.flip is the old name of train.augment.flip: keep only train.augment.flip")
    augment["flip"] = flip
    values["augment"] = augment
    return values


class TrainParams(_Strict):
    """How one run trains (the ``train`` section; a loss's ``<section>.train`` overrides keys).

    Batch and learning rate: ``batch_size`` is the GLOBAL batch, split over the processes
    (``FACEPIPE_NPROC``), unless ``batch_per_device`` is set, in which case every process
    takes that many images and the global batch is ``batch_per_device`` x processes (P x K
    losses, triplet and contrastive, always give each process its own P x K batch, so their
    global batch is ``pk_identities * pk_images`` x processes). ``lr`` is the peak learning
    rate for the global batch the run actually has; it is NOT rescaled when that batch
    changes. To keep a recipe's behaviour when the global batch goes from B to B' (another
    batch_size, or batch_per_device with another process count), follow the linear scaling
    rule (Goyal et al., 2017, "Accurate, large minibatch SGD"): lr' = lr * B' / B, keeping
    the warm-up (``warmup_epochs``), which that rule needs for large batches.
    """

    epochs: int = Field(8, ge=1)
    batch_size: int = Field(64, ge=2)
    # images per process; 0 = batch_size is the global batch (split over the processes)
    batch_per_device: int = Field(0, ge=0)
    lr: float = Field(0.1, gt=0.0)  # peak rate for the global batch (see the class doc for scaling it)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(5e-4, ge=0.0)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: float = Field(1.0, ge=0.0)
    milestones: list[int] = Field(default_factory=list)
    gamma: float = Field(0.1, gt=0.0, le=1.0)
    augment: AugmentParams = AugmentParams()  # see AugmentParams; the old key train.flip maps to augment.flip
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    # the best epoch (the saved model) by verification AUC on: the validation split of the training
    # identities ("validation"), or the pairs of a test set named in data.tests, which the report then
    # flags: that set's results are no longer an unbiased test
    select_on: str = "validation"
    pk_identities: int = Field(16, ge=2)
    pk_images: int = Field(4, ge=2)
    init_from: str | None = None
    freeze_backbone: bool = False
    workers: int = Field(0, ge=0)  # threads preparing batches; 0 = the stage's thread count
    decode: Literal["auto", "upfront", "per_batch"] = "auto"  # how batches get pixels (same bits either way)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True
    clip_grad_norm: float = Field(0.0, ge=0.0)
    max_steps_per_epoch: int = Field(0, ge=0)
    # read the loss back every this many steps to stop on NaN/inf (a per-step read stalls the GPU);
    # nothing is missed, a bad step is only reported up to this many steps later
    nan_check_every: int = Field(20, ge=1)
    # SyncBatchNorm across GPU processes: auto = only when a process holds fewer than 32 images
    sync_bn: Literal["auto"] | bool = "auto"
    # GPU only: deterministic kernels (no cuDNN autotuning, torch.use_deterministic_algorithms), slower
    deterministic: bool = False

    @model_validator(mode="before")
    @classmethod
    def _legacy_flip(cls, values: Any) -> Any:
        return _move_legacy_flip(values) if isinstance(values, dict) else values

    @property
    def flip(self) -> bool:
        """The old name of ``augment.flip`` (read-only)."""
        return self.augment.flip

    def with_overrides(self, overrides: dict[str, Any] | None) -> "TrainParams":
        """These params with a loss's recipe overrides applied and validated (ValueError otherwise).

        ``augment`` is merged key by key (``{augment: {grayscale: 0.2}}`` keeps the other
        augmentations); a legacy ``flip`` override sets ``augment.flip``."""
        if not overrides:
            return self
        merged = self.model_dump()
        update = _move_legacy_flip(dict(overrides))
        if isinstance(update.get("augment"), dict):
            update["augment"] = merged["augment"] | update["augment"]
        return TrainParams.model_validate(merged | update)

    @field_validator("sync_bn", mode="before")
    @classmethod
    def _auto_or_bool(cls, value: Any) -> Any:
        if isinstance(value, bool) or value == "auto":
            return value
        if value in ("true", "false"):
            return value == "true"
        raise ValueError("expected auto, true or false")


class EmbedParams(_Strict):
    flip: bool = True
    batch_size: int = Field(256, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"


#: ``score.threshold.source`` value naming each run's own validation pairs (not a test set).
VALIDATION_SOURCE = "validation"
#: Names a test set may not take: the training set, the validation source, the folder of
#: the tree of the pretrained models' outputs (``data/scores/pretrained``) and the key of
#: the thresholds in a run's metrics JSON.
RESERVED_SET_NAMES = ("train", VALIDATION_SOURCE, "predict", "thresholds", "pretrained")


class ThresholdParams(_Strict):
    """The fixed threshold of each run and scoring variant (``score.threshold``).

    Chosen on ``source`` by ``rule`` and applied unchanged to every test set:
    ``source`` is ``validation`` (the run's own validation pairs, split off the training
    set by the data seed as the trainer does) or a labelled test set in ``data.tests``;
    ``rule`` is ``best_accuracy`` (midpoint threshold of highest accuracy) or
    ``target_fpr`` (lowest threshold with FPR <= ``target_fpr``). A trained run without
    validation pairs (``train.val_fraction: 0``) takes it from ``fallback``, a labelled test
    set (null: ``report.in_domain``), and says so; pretrained models name theirs in
    ``pretrained.NAME.threshold_source``. A source needs at least ``min_pairs`` scored pairs
    with a fifth of them of each label (a threshold picked on a handful of pairs would silently
    move every decision); fewer is an error naming the source.
    """

    source: str = VALIDATION_SOURCE
    rule: Literal["best_accuracy", "target_fpr"] = "best_accuracy"
    target_fpr: float = Field(0.001, gt=0.0, lt=1.0)
    fallback: str | None = None
    min_pairs: int = Field(100, ge=2)


class ScoreParams(_Strict):
    distances: list[Literal["cosine", "l2"]] = Field(default_factory=lambda: ["cosine", "l2"])
    normalize: list[bool] = Field(default_factory=lambda: [True, False])
    bootstrap: int = Field(0, ge=0)  # per-run pair-bootstrap intervals (the report's intervals need none)
    threshold: ThresholdParams = ThresholdParams()

    @field_validator("distances", "normalize")
    @classmethod
    def _non_empty(cls, value: list[Any]) -> list[Any]:
        if not value or len(set(value)) != len(value):
            raise ValueError("must be a non-empty list without repeats")
        return value


class TuningRecord(_Strict):
    """Where a loss's recipe came from: written by ``python -m pipeline tune select --apply`` into
    ``tuning.<loss>`` so that the report can say how each recipe was chosen, and notice when the
    loss's params were edited since (its ``overrides`` no longer match)."""

    grid: str                      # the tuning grid's name (configs/grids/<grid>.yaml)
    config: str                    # the selected configuration
    overrides: dict[str, Any]      # what the configuration sets (dotted keys or sections, as in the grid)
    configurations: int = Field(ge=1)
    seeds: int = Field(ge=1)
    epochs: int = Field(ge=1)
    mean_val_auc: float | None = None

    def edited_keys(self, params_tree: dict[str, Any]) -> list[str]:
        """The keys of ``overrides`` whose value in ``params_tree`` is no longer the selected one."""
        edited = []
        for dotted, value in flatten_keys(self.overrides).items():
            try:
                current = _lookup(params_tree, dotted)
            except KeyError:
                current = KeyError
            if current != value:
                edited.append(dotted)
        return edited


class ReportParams(_Strict):
    primary_distance: Literal["cosine", "l2"] = "cosine"
    primary_normalize: bool = True
    in_domain: str | None = None
    cross_domain: list[str] = Field(default_factory=list)
    log_fpr: bool = True
    alpha: float = Field(0.05, gt=0.0, lt=0.5)  # family-wise error rate of each table's verdicts (Holm)
    bootstrap: int = Field(1000, ge=100)       # pair resamples for the EER and TPR@FPR intervals
    pairing: Literal["independent", "seed"] = "independent"  # verdicts' run variance: independent or per seed


class SeedParams(_Strict):
    """Two kinds of randomness, kept apart so that changing one never moves the other.

    ``data``: the synthetic faces, the train/validation split, the test pairs and the
    pair resampling of the report. ``train``: one training run per seed and loss
    (initialisation, sampling order, augmentation); the report treats the runs of a
    loss as repeats.
    """

    data: int = Field(0, ge=0)
    train: list[int] = Field(default_factory=lambda: [0, 1, 2])

    @field_validator("train")
    @classmethod
    def _distinct(cls, value: list[int]) -> list[int]:
        if not value:
            raise ValueError("at least one training seed is needed")
        if len(set(value)) != len(value):
            raise ValueError("training seeds must be distinct")
        if any(v < 0 for v in value):
            raise ValueError("training seeds must be >= 0")
        return value


class PretrainedParams(_Strict):
    """An off-the-shelf model embedded and scored beside the trained ones (``pretrained.<name>``).

    ``kind`` selects the backend and defaults to the entry's name (so ``dlib: {...}``
    is a dlib entry):

      dlib      dlib's ResNet with its own detector and chips (``upsample``, ``jitter``,
                ``mtcnn_fallback``), from the original images
      facepipe  a ``model.pt`` saved by this project's trainer (``path``, e.g. from another
                experiment or machine), embedded from the shards like a trained run
    """

    kind: Literal["dlib", "facepipe"] | None = None
    path: str | None = None
    # the labelled test set whose pairs choose this model's fixed threshold (it has no validation
    # pairs of its own); default: score.threshold.source if that is a test set, else report.in_domain.
    threshold_source: str | None = None
    upsample: int = Field(1, ge=0, le=3)
    jitter: int = Field(0, ge=0, le=100)
    mtcnn_fallback: bool = True


#: Pretrained kinds -> the keys only that kind reads (``path`` is facepipe's).
PRETRAINED_KEYS = {"dlib": ("upsample", "jitter", "mtcnn_fallback"), "facepipe": ("path",)}
#: Pretrained backends (``pipeline.baselines``): name -> install hint.
PRETRAINED_BACKENDS = {"dlib": "pip install -r requirements-dlib.txt", "facepipe": "(built in)"}


class BenchmarkSpec(_Strict):
    """A benchmark beyond image pairs (``benchmarks.<name>``, :mod:`pipeline.protocols`):

      ijb          ``path`` is an IJB-B or IJB-C release folder (``meta/``, ``loose_crop/``): 1:1
                   template verification and 1:N identification with the galleries
      distractors  ``path`` is a MegaFace-style folder of probe identities and distractor images:
                   identification as the number of distractors grows

    Every trained run is embedded and evaluated on it; ``protocol`` holds the switches.
    """

    kind: Literal["ijb", "distractors"]
    path: str


class Params(_Strict):
    seeds: SeedParams = SeedParams()
    data: DataParams
    detect: DetectParams = DetectParams()
    align: AlignParams = AlignParams()
    shard: ShardParams = ShardParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    loss: dict[str, Any] = Field(default_factory=dict)
    losses: dict[str, dict[str, Any]] = Field(default_factory=dict)
    train_losses: list[str]
    pretrained: dict[str, PretrainedParams] = Field(default_factory=dict)
    embed: EmbedParams = EmbedParams()
    score: ScoreParams = ScoreParams()
    report: ReportParams = ReportParams()
    benchmarks: dict[str, BenchmarkSpec] = Field(default_factory=dict)
    protocol: dict[str, Any] = Field(default_factory=dict)  # pipeline.protocols.params.ProtocolParams
    tuning: dict[str, TuningRecord] = Field(default_factory=dict)  # loss -> how its recipe was selected

    def protocol_params(self):
        """``protocol`` as a :class:`pipeline.protocols.params.ProtocolParams` (ConfigError when invalid)."""
        from pipeline.protocols import ProtocolError
        from pipeline.protocols.params import ProtocolParams

        try:
            return ProtocolParams.from_dict(self.protocol)
        except ProtocolError as err:
            raise ConfigError(str(err).replace("protocol params: ", "protocol.", 1)) from None
        except TypeError as err:  # a value of the wrong shape
            raise ConfigError(f"protocol: {err}") from None

    @property
    def data_sets(self) -> list[str]:
        """Every data set: ``train`` then the test sets, in params order."""
        return ["train", *self.data.tests]

    def data_spec(self, name: str) -> DatasetSpec:
        """The spec of data set ``name`` (``train`` or a test set); ConfigError naming the sets otherwise."""
        if name == "train":
            return self.data.train
        if name not in self.data.tests:
            raise ConfigError(f"data set {name!r} is not configured; the sets are {', '.join(self.data_sets)}")
        return self.data.tests[name]

    def detect_for(self, name: str) -> DetectParams:
        """``detect`` with data set ``name``'s own overrides (``data.tests.NAME.detect``) applied."""
        overrides = self.data_spec(name).detect
        return DetectParams.model_validate(self.detect.model_dump() | overrides) if overrides else self.detect

    def pretrained_threshold_source(self, name: str) -> str | None:
        """The test set whose pairs choose pretrained model ``name``'s fixed threshold: its own
        ``threshold_source``, else ``score.threshold.source`` when that names a test set, else
        ``report.in_domain`` (a pretrained model has no validation pairs)."""
        source = self.score.threshold.source
        return (self.pretrained[name].threshold_source or (source if source != VALIDATION_SOURCE else None)
                or self.report.in_domain)

    def pretrained_kind(self, name: str) -> str:
        """The backend of pretrained entry ``name``: its ``kind``, else the name itself."""
        return self.pretrained[name].kind or name

    @property
    def models(self) -> list[str]:
        """Every model in the comparison: one per trained loss, then the pretrained ones."""
        return [*self.train_losses, *self.pretrained]

    @property
    def runs(self) -> dict[str, list[str]]:
        """Model -> its runs: ``LOSS-SEED`` per training seed, the pretrained ones once."""
        out = {loss: [run_name(loss, seed) for seed in self.seeds.train] for loss in self.train_losses}
        out.update({name: [name] for name in self.pretrained})
        return out

    def check_run(self, run: str) -> None:
        """``run`` is a configured ``LOSS-SEED`` or pretrained model; ConfigError otherwise."""
        if not any(run in runs for runs in self.runs.values()):
            loss, _, seed = run.rpartition("-")
            hint = ""
            if loss in self.train_losses:
                hint = f" (seed {seed} is not in seeds.train = {self.seeds.train})"
            raise ConfigError(f"run {run!r} is not configured{hint}; runs are LOSS-SEED for train_losses x "
                              f"seeds.train, or a pretrained model: {', '.join(sum(self.runs.values(), []))}")

    def loss_section(self, name: str) -> str:
        """Where loss ``name`` keeps its params: ``loss`` for ArcFace, ``losses.<name>`` otherwise."""
        if name not in self.train_losses:
            raise ConfigError(
                f"loss {name!r} is not configured in train_losses (configured: {', '.join(self.train_losses)})"
            )
        return section_of(name)

    def loss_params(self, name: str) -> dict[str, Any]:
        """The loss's own params (without its ``train`` recipe overrides) as a plain dict."""
        values = dict(_lookup_or_empty(self.model_dump(), self.loss_section(name)))
        values.pop(RECIPE_KEY, None)
        return values

    def train_for(self, name: str) -> "TrainParams":
        """``train`` with loss ``name``'s recipe overrides (``<section>.train``) applied."""
        overrides = _lookup_or_empty(self.model_dump(), self.loss_section(name)).get(RECIPE_KEY) or {}
        return self.train.with_overrides(overrides)


#: Key inside a loss's params section that overrides ``train`` keys for that loss only
#: (its training recipe, e.g. ``losses.triplet.train: {batch_size: 128, schedule: constant}``).
RECIPE_KEY = "train"


def section_of(loss: str) -> str:
    """The params section of ``loss``."""
    return SPECIAL_SECTIONS.get(loss, f"losses.{loss}")


def run_name(loss: str, seed: int) -> str:
    """Name of one training run, as DVC names its stages (``train@arcface-1``): ``arcface-1``."""
    return f"{loss}-{seed}"


def _lookup_or_empty(tree: dict[str, Any], dotted: str) -> dict[str, Any]:
    try:
        return _lookup(tree, dotted) or {}
    except KeyError:
        return {}


def flatten_keys(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{'a': {'b': 1}}`` as ``{'a.b': 1}`` (an empty mapping stays a value)."""
    out = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten_keys(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _lookup(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def load_params(path: str | Path = DEFAULT_PARAMS, *, check_paths: bool = True, check_models: bool = True) -> Params:
    """Read and validate a params file; raise :class:`ConfigError` with one line.

    ``check_models=False`` skips the loss and backbone checks, which need PyTorch: the
    stages that neither train nor embed (score, report) start seconds faster without it;
    the recipes stage, which every training run depends on, checks them.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found (run from the project root, where params.yaml is)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    raw = _upgrade(path, raw)
    _check_tracked_keys(path, raw)
    try:
        params = Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{path}: {_first_error(err, raw)}") from None
    _check_references(path, params)
    if check_models:
        _check_models(path, params, raw)
    if check_paths:
        _check_dataset_paths(path, params)
    return params


#: Keys that dvc.yaml's stages track as params: DVC stops with "Parameters ... are missing" when the
#: params file leaves one out, so they are required here too (with a default to copy).
TRACKED_KEYS = {"data.synthetic": "each data stage", "seeds.data": "each data stage"}
TRACKED_WITH_BENCHMARKS = ("protocol.flip", "protocol.batch_size")


def _check_tracked_keys(path: Path, raw: dict[str, Any]) -> None:
    """One line for a key the DVC stages track but the params file leaves out."""
    wanted = dict(TRACKED_KEYS)
    if raw.get("benchmarks"):
        wanted.update({key: "each bench_embed stage" for key in TRACKED_WITH_BENCHMARKS})
    for key, who in wanted.items():
        try:
            _lookup(raw, key)
        except KeyError:
            raise ConfigError(f"{path}: {key}: missing; {who} tracks it as a DVC param, so the params file must "
                              f"set it (copy it from the repository's params.yaml)") from None


def _first_error(err: ValidationError, raw: dict[str, Any]) -> str:
    first = err.errors()[0]
    loc = ".".join(str(part) for part in first["loc"])
    kind = first["type"]
    if kind == "extra_forbidden":
        return f"{loc}: unknown key (check the spelling; see params.yaml in the repository for the allowed keys)"
    if kind == "missing":
        return f"{loc}: required key is missing"
    try:
        value = _lookup(raw, loc)
        shown = f" = {value!r}"
    except (KeyError, TypeError):
        shown = ""
    message = first["msg"].removeprefix("Value error, ")
    return f"{loc}{shown}: {message}"


def _upgrade(path: Path, raw: dict[str, Any]) -> dict[str, Any]:
    """Accept the previous layout where it is unambiguous; stop with a hint where it is not."""
    raw = dict(raw)
    if "seed" in raw:
        raise ConfigError(
            f"{path}: seed: replaced by seeds.data (synthetic faces, splits, test pairs) and seeds.train "
            f"(a list: one training run per seed and loss); e.g. seeds: {{data: {raw['seed']!r}, train: [0, 1, 2]}}"
        )
    if isinstance(raw.get("train"), dict) and "flip" in raw["train"]:  # train.flip -> train.augment.flip
        try:
            raw["train"] = _move_legacy_flip(raw["train"])
        except ValueError as err:
            raise ConfigError(f"{path}: {err}") from None
    losses = raw.get("train_losses")
    if isinstance(losses, dict):  # older layout: {loss: its params section}
        for name, section in losses.items():
            expected = section_of(str(name))
            if section != expected:
                raise ConfigError(
                    f"{path}: train_losses.{name} = {section!r}: the params section of {name} is {expected!r}"
                )
        raw["train_losses"] = list(losses)
    return raw


def _check_references(path: Path, params: Params) -> None:
    """Names that must refer to something configured (no PyTorch needed)."""
    if not params.train_losses:
        raise ConfigError(f"{path}: train_losses: at least one loss is needed")
    if len(set(params.train_losses)) != len(params.train_losses):
        raise ConfigError(f"{path}: train_losses: a loss is listed twice")
    trained_runs = {run for loss in params.train_losses for run in params.runs[loss]}
    for name, entry in params.pretrained.items():
        kind = params.pretrained_kind(name)
        if kind not in PRETRAINED_BACKENDS:
            raise ConfigError(f"{path}: pretrained.{name}: unknown pretrained model; set kind "
                              f"({', '.join(PRETRAINED_BACKENDS)})")
        if not name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"{path}: pretrained.{name}: a model name is letters, digits, '_' or '-'")
        if name in params.train_losses or name in trained_runs:
            raise ConfigError(f"{path}: pretrained.{name}: the name is also a trained loss or run; "
                              "names must be unique")
        for other, keys in PRETRAINED_KEYS.items():
            stray = sorted(set(keys) & entry.model_fields_set) if other != kind else []
            if stray:
                raise ConfigError(f"{path}: pretrained.{name}.{stray[0]}: only a {other} entry reads it "
                                  f"(this entry's kind is {kind})")
        if kind == "facepipe" and not entry.path:
            raise ConfigError(f"{path}: pretrained.{name}.path: required for kind facepipe (the model.pt to score)")
        source = params.pretrained_threshold_source(name)
        if source is None:
            raise ConfigError(f"{path}: pretrained.{name}.threshold_source: required when report.in_domain is not "
                              f"set (the labelled test set whose pairs choose this model's fixed threshold; one of "
                              f"{', '.join(params.data.tests)})")
        if source not in params.data.tests:
            raise ConfigError(f"{path}: pretrained.{name}.threshold_source = {source!r}: not one of data.tests "
                              f"({', '.join(params.data.tests)})")
    for name in params.benchmarks:
        if not name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"{path}: benchmarks.{name}: a benchmark name is letters, digits, '_' or '-'")
    try:
        params.protocol_params()
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    threshold = params.score.threshold
    if threshold.source != VALIDATION_SOURCE and threshold.source not in params.data.tests:
        raise ConfigError(f"{path}: score.threshold.source = {threshold.source!r}: expected {VALIDATION_SOURCE} or "
                          f"one of data.tests ({', '.join(params.data.tests)})")
    if threshold.fallback is not None and threshold.fallback not in params.data.tests:
        raise ConfigError(f"{path}: score.threshold.fallback = {threshold.fallback!r}: not one of data.tests "
                          f"({', '.join(params.data.tests)})")
    report = params.report
    if report.primary_distance not in params.score.distances or report.primary_normalize not in params.score.normalize:
        raise ConfigError(f"{path}: report.primary_distance / primary_normalize = {report.primary_distance}, "
                          f"{report.primary_normalize}: not among the scored variants (score.distances x "
                          f"score.normalize)")
    if params.report.in_domain is not None and params.report.in_domain not in params.data.tests:
        raise ConfigError(f"{path}: report.in_domain = {params.report.in_domain!r}: not one of data.tests")
    for name in params.report.cross_domain:
        if name not in params.data.tests:
            raise ConfigError(f"{path}: report.cross_domain: {name!r} is not one of data.tests")
    for name in params.train_losses:
        _check_train_recipe(path, params, name)
    if "arcface" in params.train_losses:
        margin = params.loss.get("margin", 0.5)
        if isinstance(margin, (int, float)) and not 0 <= margin < math.pi:
            raise ConfigError(f"{path}: loss.margin = {margin!r}: the ArcFace margin is in radians, 0 <= m < pi")


def _effective_train(path: Path, params: Params, name: str, section: str, recipe: Any) -> TrainParams:
    """``train`` with loss ``name``'s overrides ``recipe``; ConfigError (one line) when they are not valid."""
    if recipe is not None and not isinstance(recipe, dict):
        raise ConfigError(f"{path}: {section}.{RECIPE_KEY}: expected a mapping of train keys to override")
    try:
        return params.train.with_overrides(recipe)
    except ValidationError as err:
        merged = params.train.model_dump() | _move_legacy_flip(dict(recipe or {}))
        raise ConfigError(f"{path}: {section}.{RECIPE_KEY}.{_first_error(err, merged)}") from None
    except ValueError as err:  # a legacy flip that disagrees with augment.flip
        raise ConfigError(f"{path}: {section}.{RECIPE_KEY}: {err}") from None


def _check_train_recipe(path: Path, params: Params, name: str) -> None:
    """What one loss's training recipe may not combine: a checkpoint choice on a set that is not
    configured, and colour augmentations that a grayscale model cannot see."""
    section = section_of(name)
    recipe = _lookup_or_empty(params.model_dump(), section).get(RECIPE_KEY)
    train = _effective_train(path, params, name, section, recipe)
    where = f"{section}.{RECIPE_KEY}" if recipe and ("select_on" in recipe or "augment" in recipe) else "train"
    if train.select_on != "validation" and train.select_on not in params.data.tests:
        raise ConfigError(f"{path}: {where}.select_on = {train.select_on!r}: expected 'validation' or one of "
                          f"data.tests ({', '.join(params.data.tests)})")
    if params.model.grayscale:
        for key in ("grayscale", "saturation"):
            if getattr(train.augment, key) > 0:
                raise ConfigError(f"{path}: {where}.augment.{key} = {getattr(train.augment, key)!r} has no effect "
                                  f"with model.grayscale: true (the model sees grey images); set it to 0")


def _check_models(path: Path, params: Params, raw: dict[str, Any]) -> None:
    """Every loss's params and recipe overrides, and the backbone (needs PyTorch)."""
    from pipeline import losses as loss_registry

    known = loss_registry.available()
    for name in params.train_losses:
        if name not in known:
            raise ConfigError(f"{path}: train_losses: {name!r} is an unknown loss (known: {', '.join(known)})")
        section = section_of(name)
        try:
            values = _lookup(raw, section)
        except KeyError:
            values = {}
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: {section}: expected a mapping of {name} parameters")
        values = dict(values)
        recipe = values.pop(RECIPE_KEY, None) or {}
        if not isinstance(recipe, dict):
            raise ConfigError(f"{path}: {section}.{RECIPE_KEY}: expected a mapping of train keys to override")
        _effective_train(path, params, name, section, recipe)
        try:
            loss_registry.validate_params(name, values)
        except ValueError as err:
            raise ConfigError(f"{path}: {section}: {err}") from None
    for name in params.losses:
        if name not in known:
            raise ConfigError(f"{path}: losses.{name}: unknown loss (known: {', '.join(known)})")
    try:
        from pipeline.models import available_backbones

        backbones = available_backbones()
    except ImportError:  # pragma: no cover - models package always ships
        backbones = []
    if backbones and params.model.backbone not in backbones:
        raise ConfigError(
            f"{path}: model.backbone = {params.model.backbone!r}: unknown backbone (known: {', '.join(backbones)})"
        )


def _check_dataset_paths(path: Path, params: Params) -> None:
    from pipeline.datasets import DatasetError
    from pipeline.datasets.checks import check_dataset_files

    specs = {"data.train": params.data.train} | {f"data.tests.{k}": v for k, v in params.data.tests.items()}
    for key, spec in specs.items():
        if spec.kind == "synthetic" or spec.download:
            continue
        target = Path(spec.path or "")
        if not target.exists():
            raise ConfigError(f"{path}: {key}.path = {spec.path!r}: no such file or folder")
        try:  # cheap: header, columns, layout (the adapters' own one-line messages)
            check_dataset_files(spec)
        except DatasetError as err:
            raise ConfigError(f"{path}: {key}: {err}") from None
        for name in spec.exclude_identities_of:
            if name not in params.data.tests:
                raise ConfigError(f"{path}: {key}.exclude_identities_of: {name!r} is not one of data.tests")
    for name, bench in params.benchmarks.items():
        if not Path(bench.path).is_dir():
            raise ConfigError(f"{path}: benchmarks.{name}.path = {bench.path!r}: no such folder")
    unlabelled = [name for name, spec in params.data.tests.items() if not is_labelled(spec)]
    threshold, report = params.score.threshold, params.report
    uses = [("score.threshold.source", threshold.source), ("score.threshold.fallback", threshold.fallback),
            ("report.in_domain", report.in_domain)] + [("report.cross_domain", name) for name in report.cross_domain]
    uses += [(f"pretrained.{name}.threshold_source", params.pretrained_threshold_source(name))
             for name in params.pretrained]
    for key, name in uses:
        if name in unlabelled:
            raise ConfigError(f"{path}: {key} = {name!r}: that test set has no labels (its pairs CSV has no `same` "
                              f"column); it is predicted only, so pick a labelled set")
    for name, entry in params.pretrained.items():
        if params.pretrained_kind(name) == "facepipe" and not Path(entry.path or "").is_file():
            raise ConfigError(f"{path}: pretrained.{name}.path = {entry.path!r}: no such model file")


def is_labelled(spec: DatasetSpec) -> bool:
    """Whether a test set has same/different labels: every kind does except a pairs CSV
    without a ``same`` column (read from its header; a missing file counts as labelled
    here, and the data stage reports it)."""
    if spec.kind != "pairs_csv" or spec.download:
        return True
    from pipeline.datasets.pairs_csv import has_labels

    return has_labels(spec.path or "")
