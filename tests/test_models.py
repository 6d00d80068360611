"""Tests for pipeline.models: shapes, parameter counts, freezing, learning, errors."""

from __future__ import annotations

import functools

import pytest
import torch
import torchvision
from torch import nn

from pipeline.models import (
    BACKBONES,
    HEADS,
    EmbeddingModel,
    available_backbones,
    build_model,
    count_parameters,
)
from pipeline.models import backbones as backbones_mod


@functools.lru_cache(maxsize=None)
def _cached(backbone: str, **kwargs: object) -> EmbeddingModel:
    """One shared instance per configuration, for read-only (eval-mode) tests."""
    torch.manual_seed(0)
    return build_model(backbone, **kwargs).eval()


@pytest.fixture(autouse=True, scope="module")
def _one_thread_and_free_models():
    """One intra-op thread (on a small shared CPU, oversubscribed OpenMP threads make
    convolutions several times slower); afterwards restore it and drop cached models."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    _cached.cache_clear()


def _embed(model: EmbeddingModel, batch: int = 2, size: int | None = None) -> torch.Tensor:
    size = size or model.input_size
    with torch.no_grad():
        return model(torch.randn(batch, model.in_channels, size, size))


# ------------------------------------------------------------------------ shapes
def test_registry_lists_required_backbones() -> None:
    names = available_backbones()
    assert names == sorted(BACKBONES)
    for required in ("smallcnn", "resnet18", "resnet34", "resnet50", "iresnet50"):
        assert required in names


# The deeper optional variants run a real forward pass at 64x64 (4x cheaper) to keep
# the file fast; their 112 shape is still checked through feature_shape.
_REAL_112 = {"smallcnn", "resnet18", "resnet50", "iresnet50"}
_CHANNELS = {"smallcnn": 128, "resnet18": 512, "resnet34": 512, "resnet50": 2048}


@pytest.mark.parametrize("backbone", available_backbones())
def test_every_backbone_at_112_ends_at_7x7(backbone: str) -> None:
    model = _cached(backbone)
    assert model.feature_shape == (_CHANNELS.get(backbone, 512), 7, 7)
    size = 112 if backbone in _REAL_112 else 64
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        features = model.backbone(x)  # the backbone alone accepts any input size
        emb = model.head(features)
    assert features.shape[-2:] == ((7, 7) if size == 112 else (4, 4))
    assert features.shape[1] == model.backbone.out_channels == model.feature_shape[0]
    assert emb.shape == (2, 512)
    assert torch.isfinite(emb).all()


@pytest.mark.parametrize("backbone", ["resnet18", "smallcnn"])
def test_224_input(backbone: str) -> None:
    model = _cached(backbone, input_size=224, embedding_size=256)
    assert model.feature_shape[-2:] == (14, 14)
    # The flattening head pools the 14x14 map to 7x7, so FC size matches the 112 model.
    assert model.head.in_features == model.feature_shape[0] * 49
    assert _embed(model, batch=1 if backbone == "resnet18" else 2).shape[1] == 256


@pytest.mark.parametrize("size, grid", [(56, 3), (96, 6), (160, 10)])
def test_other_input_sizes(size: int, grid: int) -> None:
    model = _cached("smallcnn", input_size=size)
    assert model.feature_shape == (128, grid, grid)
    assert _embed(model).shape == (2, 512)


@pytest.mark.parametrize("backbone", ["smallcnn", "resnet18", "iresnet18"])
def test_grayscale_input(backbone: str) -> None:
    model = _cached(backbone, in_channels=1, embedding_size=256)
    first_conv = next(m for m in model.backbone.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == 1
    assert _embed(model).shape == (2, 256)
    with pytest.raises(ValueError, match="in_channels=1"):
        model(torch.randn(2, 3, 112, 112))


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("size", [128, 256, 512])
def test_heads_and_embedding_sizes(head: str, size: int) -> None:
    model = _cached("smallcnn", embedding_size=size, head=head)
    emb = _embed(model, batch=3)
    assert emb.shape == (3, size)
    assert model.embedding_size == size
    channels = model.feature_shape[0]
    assert model.head.in_features == (channels * 49 if head == "bn_dropout_fc_bn" else channels)
    has_final_bn = isinstance(model.head.layers[-1], nn.BatchNorm1d)
    assert has_final_bn == (head != "pool_fc")
    # Raw embeddings: not L2-normalised.
    assert not torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-2)


@pytest.mark.parametrize("head", HEADS)
def test_registered_backbone_with_flat_features(monkeypatch, head: str) -> None:
    def tiny_flat(in_channels: int = 3, pretrained: bool = False) -> nn.Module:
        return nn.Sequential(nn.Conv2d(in_channels, 24, 3, 4), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    monkeypatch.setitem(BACKBONES, "tiny_flat", tiny_flat)
    model = build_model("tiny_flat", embedding_size=32, head=head, dropout=0.3)
    assert model.feature_shape == (24,)
    assert model.head.in_features == 24
    kinds = [type(m) for m in model.head.layers]
    expected = {
        "bn_dropout_fc_bn": [nn.BatchNorm1d, nn.Dropout, nn.Linear, nn.BatchNorm1d],
        "pool_fc": [nn.Dropout, nn.Linear],
        "pool_fc_bn": [nn.Dropout, nn.Linear, nn.BatchNorm1d],
    }[head]
    assert kinds == expected
    model.train()
    assert model(torch.randn(4, 3, 112, 112)).shape == (4, 32)


def test_dropout_layer_only_when_requested() -> None:
    without = _cached("smallcnn")
    with_drop = _cached("smallcnn", dropout=0.4)
    assert not any(isinstance(m, nn.Dropout) for m in without.head.modules())
    drops = [m for m in with_drop.head.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 1 and drops[0].p == pytest.approx(0.4)
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():  # eval mode: dropout off, deterministic
        assert torch.equal(with_drop(x), with_drop(x))


def test_config_rebuilds_same_architecture() -> None:
    model = _cached("smallcnn", embedding_size=256, head="pool_fc_bn", dropout=0.1)
    clone = build_model(**model.config)
    clone.load_state_dict(model.state_dict())  # strict: same parameter names and shapes
    clone.eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        assert torch.allclose(clone(x), model(x))


# -------------------------------------------------------------- parameter counts
@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
def test_resnet_parameter_count_matches_torchvision(name: str) -> None:
    tv = getattr(torchvision.models, name)(weights=None)
    expected = count_parameters(tv) - count_parameters(tv.fc)
    ours = count_parameters(BACKBONES[name]())
    # Only the stem (7x7 -> 3x3) and, for BasicBlock nets, one 1x1 shortcut differ.
    assert abs(ours - expected) / expected < 0.001
    if name == "resnet50":
        assert ours > 23_000_000


def test_iresnet50_and_smallcnn_parameter_counts() -> None:
    model = _cached("iresnet50")
    backbone, head = count_parameters(model.backbone), count_parameters(model.head)
    assert 30e6 < backbone < 32e6  # ArcFace IResNet-50 body
    assert head == 2 * 512 + 512 * 49 * 512 + 512 + 2 * 512  # BN2d + FC + BN1d
    assert 42e6 < backbone + head < 45e6  # the usual "43.6M" IResNet-50
    assert count_parameters(_cached("smallcnn").backbone) < 1_000_000


# ------------------------------------------------------------------------ freezing
def _bn_stats(module: nn.Module) -> list[torch.Tensor]:
    return [
        t.clone()
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for t in (m.running_mean, m.running_var)
    ]


@pytest.mark.parametrize("backbone", ["smallcnn", "resnet18"])
def test_freeze_backbone(backbone: str) -> None:
    torch.manual_seed(0)
    model = build_model(backbone, embedding_size=128).train()
    model.freeze_backbone()
    model.train()  # must not put the frozen backbone back in train mode
    assert model.training and model.head.training and not model.backbone.training
    assert count_parameters(model, trainable_only=True) == count_parameters(model.head)

    backbone_before = [p.clone() for p in model.backbone.parameters()]
    head_before = [p.clone() for p in model.head.parameters()]
    bb_stats, head_stats = _bn_stats(model.backbone), _bn_stats(model.head)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.1, momentum=0.9)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 3, 112, 112)).pow(2).mean().backward()
        opt.step()

    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(torch.equal(a, b) for a, b in zip(backbone_before, model.backbone.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(bb_stats, _bn_stats(model.backbone)))
    assert all(p.grad is not None for p in model.head.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(head_before, model.head.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(head_stats, _bn_stats(model.head)))

    model.freeze_backbone(False)
    assert model.backbone.training
    assert all(p.requires_grad for p in model.parameters())


# ------------------------------------------------------------------------ learning
def _template_task(
    classes: int, per_class: int, size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    templates = torch.rand(classes, 3, size, size, generator=g) * 2 - 1
    labels = torch.arange(classes).repeat_interleave(per_class)
    noise = 0.5 * torch.randn(len(labels), 3, size, size, generator=g)
    return templates, (templates[labels] + noise).clamp(-1, 1), labels


def _recalibrate_batchnorm(model: nn.Module, x: torch.Tensor) -> None:
    """Set every BN's running statistics to the exact statistics over ``x``."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: one pass gives the exact statistics
    model.train()
    with torch.no_grad():
        model(x)
    for bn in bns:
        bn.momentum = 0.1
    model.eval()


@pytest.mark.parametrize("head", ["bn_dropout_fc_bn", "pool_fc_bn"])
def test_sgd_reduces_cross_entropy_and_generalises(head: str) -> None:
    torch.manual_seed(0)
    classes, size = 4, 112
    templates, x, y = _template_task(classes, per_class=6, size=size, seed=1)
    model = build_model("smallcnn", embedding_size=64, head=head, dropout=0.2)
    classifier = nn.Linear(64, classes)
    params = [*model.parameters(), *classifier.parameters()]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)

    losses = []
    model.train()
    for _ in range(12):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(classifier(model(x)), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses

    # Fresh noisy samples of the same templates, in eval mode (after settling the BN
    # running statistics, which 12 steps at momentum 0.1 leave far from converged),
    # are classified well above chance (25%).
    _recalibrate_batchnorm(model, x)
    g = torch.Generator().manual_seed(2)
    y_test = torch.arange(classes).repeat_interleave(5)
    noise = 0.5 * torch.randn(len(y_test), 3, size, size, generator=g)
    with torch.no_grad():
        logits = classifier(model((templates[y_test] + noise).clamp(-1, 1)))
    accuracy = (logits.argmax(1) == y_test).float().mean().item()
    assert accuracy >= 0.75, accuracy


# -------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(backbone="vgg16"), "available: .*resnet18"),
        (dict(backbone="smallcnn", embedding_size=0), "embedding_size"),
        (dict(backbone="smallcnn", embedding_size=-5), "embedding_size"),
        (dict(backbone="smallcnn", embedding_size=12.5), "embedding_size"),
        (dict(backbone="smallcnn", dropout=1.0), "dropout"),
        (dict(backbone="smallcnn", dropout=-0.1), "dropout"),
        (dict(backbone="smallcnn", in_channels=2), "in_channels"),
        (dict(backbone="smallcnn", in_channels=4), "in_channels"),
        (dict(backbone="smallcnn", head="mlp"), "head"),
        (dict(backbone="smallcnn", input_size=16), "input_size"),
        (dict(backbone="smallcnn", pretrained_backbone=True), "pretrained"),
        (dict(backbone="iresnet50", pretrained_backbone=True), "pretrained"),
    ],
)
def test_invalid_arguments_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_model(**kwargs)


def test_wrong_input_shape_raises() -> None:
    model = _cached("smallcnn")
    with pytest.raises(ValueError, match="input_size=112"):
        model(torch.randn(2, 3, 96, 96))
    with pytest.raises(ValueError, match=r"\[2, 3, 112\]"):
        model(torch.randn(2, 3, 112))


def test_pretrained_resnet_missing_from_hub_cache_fails_clearly(tmp_path) -> None:
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path))
    try:
        with pytest.raises(RuntimeError, match="not available offline") as info:
            build_model("resnet18", pretrained_backbone=True)
    finally:
        torch.hub.set_dir(old)
    assert str(tmp_path / "checkpoints" / "resnet18-") in str(info.value)


@pytest.mark.parametrize("in_channels", [3, 1])
def test_pretrained_stem_uses_centre_of_imagenet_kernel(monkeypatch, in_channels: int) -> None:
    # Stand-in for the hub-cache loader (no weights offline): a torchvision ResNet
    # with known random weights; what is tested is how they are adapted.
    torch.manual_seed(3)
    source = torchvision.models.resnet18(weights=None)
    monkeypatch.setattr(backbones_mod, "_load_pretrained_resnet", lambda name: source)
    model = build_model("resnet18", in_channels=in_channels, pretrained_backbone=True)
    centre = source.conv1.weight[:, :, 2:5, 2:5]
    if in_channels == 1:
        centre = centre.sum(dim=1, keepdim=True)
    assert torch.equal(model.backbone.conv1.weight, centre)
    assert torch.equal(model.backbone.layer3[0].conv1.weight, source.layer3[0].conv1.weight)
    assert model.config["pretrained_backbone"] is True


@pytest.mark.parametrize("head", HEADS)
def test_head_runs_in_float32_under_autocast(head: str) -> None:
    """Backbone in the autocast dtype, embedding head (BN, FC, BN) in fp32 on the upcast
    features, as on a GPU with bf16 (CPU autocast stands in for it: same mechanism)."""
    torch.manual_seed(0)
    model = build_model("smallcnn", embedding_size=32, head=head).train()
    x = torch.randn(4, 3, 112, 112)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = model.backbone(x)
        emb = model(x)
    assert features.dtype == torch.bfloat16  # autocast is on for the backbone
    assert emb.dtype == torch.float32
    model.eval()  # same BN statistics for the reference
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = model.backbone(x)
        emb = model(x)
    torch.testing.assert_close(emb, model.head(features.float()), rtol=0, atol=0)


def test_flatten_head_passes_a_7x7_map_through_its_pool() -> None:
    from pipeline.models.heads import GridPool

    pool = _cached("smallcnn", input_size=112).head.layers[0]
    assert isinstance(pool, GridPool) and pool.output_size == (7, 7)
    x = torch.randn(2, 5, 7, 7, requires_grad=True)
    assert pool(x) is x  # no pooling kernel (forward or backward) for the usual 112 input
    assert torch.equal(nn.AdaptiveAvgPool2d(7)(x), x)  # which is what pooling it gives, bit for bit
    for size in (4, 14):  # other maps are pooled as before
        y = torch.randn(2, 5, size, size)
        assert torch.equal(pool(y), nn.AdaptiveAvgPool2d(7)(y))
