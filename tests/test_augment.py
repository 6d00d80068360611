"""Training-time augmentation: each operation by hand, seeding, the off path, the trainer, the contact sheet."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline import augment
from pipeline.augment import COLUMNS, N_DRAWS, apply, epoch_draws
from pipeline.config import AugmentParams, TrainParams

ALL_ON = AugmentParams(crop_area=(0.6, 0.9), crop_ratio=(0.8, 1.25), scale_jitter=0.2, brightness=0.3, contrast=0.3,
                       saturation=0.4, temperature=0.2, grayscale=0.3)


def _draws(n: int, **columns: float) -> torch.Tensor:
    """``[n, N_DRAWS]`` draws: 0.5 everywhere except the named columns."""
    u = torch.full((n, N_DRAWS), 0.5)
    for name, value in columns.items():
        u[:, COLUMNS.index(name)] = value
    return u


def _images(n: int = 4, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), generator=g, dtype=torch.uint8)


# ----------------------------------------------------------------- each operation by hand
def test_brightness_contrast_saturation_temperature_by_hand():
    x = torch.tensor([[[[100.0, 40.0], [200.0, 10.0]],       # R
                       [[50.0, 60.0], [100.0, 20.0]],        # G
                       [[20.0, 80.0], [30.0, 250.0]]]])      # B   -> [1, 3, 2, 2]
    r, g, b = (x[0, c].numpy().astype(np.float64) for c in range(3))
    grey = 0.299 * r + 0.587 * g + 0.114 * b

    out = apply(x, _draws(1, brightness=1.0), AugmentParams(brightness=0.25))  # factor 1.25, clamped at 255
    np.testing.assert_allclose(out[0].numpy(), np.clip(x[0].numpy() * 1.25, 0, 255), rtol=1e-6)

    out = apply(x, _draws(1, contrast=0.0), AugmentParams(contrast=0.5))  # factor 0.5 about the mean grey
    mean = grey.mean()
    np.testing.assert_allclose(out[0].numpy(), np.stack([(c - mean) * 0.5 + mean for c in (r, g, b)]), rtol=1e-5)

    out = apply(x, _draws(1, saturation=0.0), AugmentParams(saturation=0.5))  # halfway to each pixel's grey
    np.testing.assert_allclose(out[0].numpy(), np.stack([grey + (c - grey) * 0.5 for c in (r, g, b)]), rtol=1e-5)

    out = apply(x, _draws(1, temperature=1.0), AugmentParams(temperature=0.2))  # warmest: R x 1.2, B x 0.8
    np.testing.assert_allclose(out[0].numpy(), np.stack([np.clip(r * 1.2, 0, 255), g, b * 0.8]), rtol=1e-6)
    out = apply(x, _draws(1, temperature=0.0), AugmentParams(temperature=0.2))  # coolest: R x 0.8, B x 1.2
    np.testing.assert_allclose(out[0].numpy(), np.stack([r * 0.8, g, np.clip(b * 1.2, 0, 255)]), rtol=1e-6)


def test_colour_factors_are_per_image():
    """Two images, two draws: each image gets its own factor and its own mean grey."""
    x = torch.stack([torch.full((3, 2, 2), 60.0), torch.tensor([[[0.0, 200.0], [100.0, 100.0]]] * 3)])  # means 60, 100
    u = _draws(2)
    u[:, COLUMNS.index("brightness")] = torch.tensor([0.0, 1.0])
    out = apply(x, u, AugmentParams(brightness=0.5))
    torch.testing.assert_close(out[0], x[0] * 0.5)
    torch.testing.assert_close(out[1], (x[1] * 1.5).clamp(0, 255))
    u = _draws(2, contrast=0.0)
    out = apply(x, u, AugmentParams(contrast=0.5))
    torch.testing.assert_close(out[0], x[0])  # a flat image keeps its values about its own mean
    torch.testing.assert_close(out[1], (x[1] - 100.0) * 0.5 + 100.0)


def test_random_grayscale_turns_exactly_the_drawn_images_grey():
    x = _images(4).permute(0, 3, 1, 2).float()
    u = _draws(4)
    u[:, COLUMNS.index("grayscale")] = torch.tensor([0.1, 0.5, 0.29, 0.31])
    out = apply(x, u, AugmentParams(grayscale=0.3))
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    grey = (x * weights).sum(1, keepdim=True).expand_as(x)
    for i, turned in enumerate([True, False, True, False]):
        torch.testing.assert_close(out[i], grey[i] if turned else x[i])


def test_centre_crop_of_a_ramp_is_the_ramp_resampled():
    """Area 1/4 with ratio 1 at the centre: the middle half of the image enlarged 2x. On a linear
    ramp bilinear resampling is exact, so each output column has the ramp's value at the point
    it maps to (pixel centres, coordinates in pixels)."""
    size = 8
    ramp = torch.arange(size, dtype=torch.float32).view(1, 1, 1, size).expand(1, 3, size, size).contiguous() * 10
    params = AugmentParams(crop_area=(0.25, 0.25), crop_ratio=(1.0, 1.0))
    out = apply(ramp, _draws(1, centre_x=0.5, centre_y=0.5), params)[0, 0].numpy()
    j = np.arange(size)
    source = (size / 2 - 0.5) + 0.5 * (j + 0.5 - size / 2)  # output pixel j samples here (pixel units)
    np.testing.assert_allclose(out, np.tile(10 * source, (size, 1)), atol=1e-4)
    # centre_x = 1: the crop touches the right edge (columns 4..7 enlarged); the last output column
    # samples half a pixel past the last pixel centre, where the mirrored edge gives the edge value
    right = apply(ramp, _draws(1, centre_x=1.0, centre_y=0.5), params)[0, 0].numpy()
    np.testing.assert_allclose(right[0], 10 * np.minimum(source + size / 4, size - 1), atol=1e-4)


def test_crop_area_and_ratio_set_the_crop_size():
    """A 2:1 (wide) crop of area 1/2: width sqrt(1/2 * 2) = 1 (whole width), height 1/2."""
    size = 8
    rows = torch.arange(size, dtype=torch.float32).view(1, 1, size, 1).expand(1, 3, size, size).contiguous()
    params = AugmentParams(crop_area=(0.5, 0.5), crop_ratio=(2.0, 2.0))
    out = apply(rows, _draws(1), params)[0, 0].numpy()
    i = np.arange(size)
    np.testing.assert_allclose(out[:, 0], (size / 2 - 0.5) + 0.5 * (i + 0.5 - size / 2), atol=1e-4)  # rows: 2x
    cols = rows.transpose(2, 3).contiguous()
    np.testing.assert_allclose(apply(cols, _draws(1), params)[0, 0].numpy()[0], i, atol=1e-4)  # columns: as they were


def test_zoom_out_shrinks_the_face_and_mirrors_the_border():
    size = 16
    ramp = torch.arange(size, dtype=torch.float32).view(1, 1, 1, size).expand(1, 3, size, size).contiguous()
    out = apply(ramp, _draws(1, zoom=0.0), AugmentParams(scale_jitter=0.5))[0, 0].numpy()  # z = 0.5: half size
    j = np.arange(size)
    source = (size / 2 - 0.5) + 2.0 * (j + 0.5 - size / 2)  # pixel units; outside [-0.5, size - 0.5]: mirrored
    source = np.where(source > size - 0.5, 2 * (size - 0.5) - source, source)
    source = np.where(source < -0.5, -1.0 - source, source)
    np.testing.assert_allclose(out, np.tile(np.clip(source, 0, size - 1), (size, 1)), atol=1e-4)
    zoom_in = apply(ramp, _draws(1, zoom=1.0), AugmentParams(scale_jitter=0.5))[0, 0].numpy()  # z = 1.5
    np.testing.assert_allclose(zoom_in[0], (size / 2 - 0.5) + (j + 0.5 - size / 2) / 1.5, atol=1e-4)


# ------------------------------------------------------------------------------ seeding
def test_same_seed_same_batches_other_seed_or_epoch_other_batches():
    images = _images(6)
    first = epoch_draws(ALL_ON, seed=3, epoch=1, steps=2, global_batch=6)
    again = epoch_draws(ALL_ON, seed=3, epoch=1, steps=2, global_batch=6)
    assert first.shape == (2, 6, N_DRAWS) and torch.equal(first, again)

    def batch(draws):
        return augment.apply_uint8(images, draws[0], ALL_ON)

    assert torch.equal(batch(first), batch(again))
    for other in (epoch_draws(ALL_ON, seed=4, epoch=1, steps=2, global_batch=6),
                  epoch_draws(ALL_ON, seed=3, epoch=2, steps=2, global_batch=6)):
        assert not torch.equal(batch(first), batch(other))


def test_each_process_gets_its_slice_of_the_global_draws():
    whole = epoch_draws(ALL_ON, seed=0, epoch=0, steps=3, global_batch=8)
    halves = [epoch_draws(ALL_ON, seed=0, epoch=0, steps=3, global_batch=8, rank=r, world=2) for r in (0, 1)]
    assert torch.equal(torch.cat(halves, dim=1), whole)


def test_nothing_is_drawn_when_only_the_flip_is_on():
    assert epoch_draws(AugmentParams(), 0, 0, 5, 8) is None
    assert epoch_draws(AugmentParams(flip=False), 0, 0, 5, 8) is None
    assert AugmentParams().active() == [] and ALL_ON.active() == [
        "crop", "scale_jitter", "brightness", "contrast", "saturation", "temperature", "grayscale"]


# ------------------------------------------------------------------ the trainer's input
def _input_before_augmentation(images: torch.Tensor, flips: torch.Tensor, *, grayscale: bool) -> torch.Tensor:
    """The trainer's input code before train.augment existed (to_input, then flip_rows), verbatim."""
    x = images.permute(0, 3, 1, 2).float()
    if grayscale:
        weights = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
        x = (x * weights).sum(dim=1, keepdim=True)
    x = (x - 127.5) / 128.0
    return x.copy_(torch.where(flips.view(-1, 1, 1, 1), x.flip(-1), x))


@pytest.mark.parametrize("grayscale", [False, True])
def test_input_with_augmentation_off_is_bit_identical_to_before(grayscale):
    from pipeline.train import batch_input, flip_rows

    images = _images(8, size=32)
    flips = torch.tensor([True, False, True, True, False, False, True, False])
    params = AugmentParams()
    draws = epoch_draws(params, 0, 0, 1, 8)
    x = batch_input(images, None if draws is None else draws[0], params, grayscale=grayscale)
    x = flip_rows(x, flips)
    assert torch.equal(x, _input_before_augmentation(images, flips, grayscale=grayscale))


def test_input_with_augmentation_on_is_augmented_then_scaled():
    from pipeline.train import batch_input

    images = _images(4, size=32)
    draws = epoch_draws(ALL_ON, 0, 0, 1, 4)[0]
    x = batch_input(images, draws, ALL_ON, grayscale=False)
    expected = (apply(images.permute(0, 3, 1, 2).float(), draws, ALL_ON) - 127.5) / 128.0
    assert torch.equal(x, expected)
    assert not torch.equal(x, (images.permute(0, 3, 1, 2).float() - 127.5) / 128.0)


def test_augmented_input_reads_nothing_back_from_the_device():
    """torch.compile(fullgraph=True) refuses a graph with a host read (item(), boolean indexing)."""
    from pipeline.train import batch_input

    torch._dynamo.reset()
    images = _images(4, size=32)
    draws = epoch_draws(ALL_ON, 0, 0, 1, 4)[0]
    traced = torch.compile(lambda i, d: batch_input(i, d, ALL_ON, grayscale=False), backend="eager", fullgraph=True)
    torch.testing.assert_close(traced(images, draws), batch_input(images, draws, ALL_ON, grayscale=False))


def _train_weights(tmp_path, name, monkeypatch=None, **train_overrides):
    from tests.test_train import _setup, _shards
    from pipeline.train import train

    shards = tmp_path / "shards"
    if not shards.is_dir():
        _shards(tmp_path)
    out = tmp_path / name
    metrics = train(_setup(epochs=2, **train_overrides), shards, out / "model", out / "ckpt", out / "report",
                    progress=False)
    return metrics, torch.load(out / "model" / "model.pt", weights_only=False)["model"]


def test_training_with_augmentation_off_trains_the_model_of_the_code_before(tmp_path, monkeypatch):
    """The whole run, not just one batch: the trainer's input step replaced by the code it had
    before augmentation existed gives the same metrics and the same weights, bit for bit."""
    from pipeline import train as train_module

    new = _train_weights(tmp_path, "new")
    monkeypatch.setattr(train_module, "batch_input",
                        lambda images, draws, params, *, grayscale: train_module.to_input(images, grayscale=grayscale))
    old = _train_weights(tmp_path, "old")
    assert new[0] == old[0]
    for key, tensor in new[1].items():
        assert torch.equal(tensor, old[1][key]), key


def test_trainer_feeds_each_step_its_own_draws(tmp_path, monkeypatch):
    """The draws the trainer hands to the augmentation are, step by step, those of
    epoch_draws(seed, epoch) for that step: no step reuses another's, no epoch another's."""
    from tests.test_train import _setup

    seen = []
    real_apply = augment.apply

    def recording(x, draws, params):
        seen.append(draws.clone())
        return real_apply(x, draws, params)

    monkeypatch.setattr(augment, "apply", recording)
    metrics, _ = _train_weights(tmp_path, "record", augment={"brightness": 0.2})
    setup = _setup(epochs=2, augment={"brightness": 0.2})
    steps = metrics["steps"] // 2
    expected = [epoch_draws(setup.train.augment, setup.seed, epoch, steps, 8)[k] for epoch in (0, 1)
                for k in range(steps)]
    assert len(seen) == len(expected) == 2 * steps and steps > 1
    for got, want in zip(seen, expected):
        assert torch.equal(got, want)


def test_training_with_augmentation_is_seeded_and_resumes_exactly(tmp_path, monkeypatch):
    """Same seed -> same model; the augmentation changes the model; a run that stops after epoch 1
    and is restarted ends with the weights of the uninterrupted run."""
    from pipeline import train as train_module

    aug = {"augment": ALL_ON.model_dump()}
    clean = _train_weights(tmp_path, "clean", **aug)
    again = _train_weights(tmp_path, "again", **aug)
    plain = _train_weights(tmp_path, "plain")
    assert all(torch.equal(t, again[1][k]) for k, t in clean[1].items())
    assert any(not torch.equal(t, plain[1][k]) for k, t in clean[1].items())

    real = train_module.validation_auc
    calls = {"n": 0}

    def crash_in_epoch_2(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated crash before the epoch-2 checkpoint")
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "validation_auc", crash_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        _train_weights(tmp_path, "crashed", **aug)
    monkeypatch.setattr(train_module, "validation_auc", real)
    resumed = _train_weights(tmp_path, "crashed", **aug)
    assert resumed[0] == clean[0]
    assert all(torch.equal(t, resumed[1][k]) for k, t in clean[1].items())


# ------------------------------------------------------------------------ contact sheet
def test_preview_shows_the_faces_plain_flipped_and_under_each_augmentation(tmp_path):
    images = _images(3, size=24).numpy()
    titles, tiles = augment.preview_grid(images, ALL_ON, seed=0)
    assert tiles.shape == (3, len(titles), 24, 24, 3)
    assert titles[0] == "original" and titles[1].startswith("flip")
    assert len(titles) == 2 + 7 + 2  # original, flip, the 7 augmentations alone, all together twice
    np.testing.assert_array_equal(tiles[:, 0], images)
    np.testing.assert_array_equal(tiles[:, 1], images[:, :, ::-1])
    for c in range(2, len(titles)):
        assert not np.array_equal(tiles[:, c], images), titles[c]
    only_flip, _ = augment.preview_grid(images, AugmentParams(), seed=0)
    assert only_flip == ["original", "flip (p=0.5)"]


def test_preview_stage_writes_the_contact_sheet(tmp_path):
    from tests.test_train import _shards

    shards = _shards(tmp_path, n_ids=3, per=3)
    target = augment.write_preview(ALL_ON, shards / "train", tmp_path / "figures" / "augmented.png", faces=3)
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- params
def test_train_flip_is_read_as_augment_flip():
    assert TrainParams(flip=False).augment.flip is False and TrainParams(flip=False).flip is False
    assert TrainParams().augment == AugmentParams() and "flip" not in TrainParams().model_dump()
    with pytest.raises(ValueError, match="train.flip is the old name of train.augment.flip"):
        TrainParams(flip=False, augment={"flip": True})
    merged = TrainParams(augment={"brightness": 0.2}).with_overrides({"augment": {"grayscale": 0.1}, "flip": False})
    assert merged.augment == AugmentParams(flip=False, brightness=0.2, grayscale=0.1)


def test_strengths_are_checked():
    for bad in ({"crop_area": (0.0, 1.0)}, {"crop_area": (0.9, 0.5)}, {"crop_ratio": (2.0, 1.0)},
                {"brightness": 1.0}, {"grayscale": 1.5}, {"scale_jitter": -0.1}):
        with pytest.raises(ValueError):
            AugmentParams(**bad)
    assert math.isclose(AugmentParams().crop_ratio[1], 4 / 3)
