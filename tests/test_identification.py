"""Closed-set identification (the saved classifier head, N-way accuracy) and angle distributions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import EmbedParams, ScoreParams
from pipeline.train import load_head, load_model, train
from tests.test_select_on import _project, _setup


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return _project(tmp_path_factory.mktemp("identification"))


# ------------------------------------------------------- the saved head and its predictions
@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory) -> dict[str, Path]:
    """softmax and triplet trained 4 epochs on the module's shards; their model.pt."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for loss, extra in (("softmax", {}), ("triplet", {"pk_identities": 3, "pk_images": 2})):
        setup = _setup(loss, epochs=4, lr=0.1, **extra)
        train(setup, shards, root / loss / "m", root / loss / "c", root / loss / "r", progress=False)
        out[loss] = root / loss / "m" / "model.pt"
    return out


def test_model_keeps_the_class_weights_and_the_identity_names(trained):
    _, saved = load_model(trained["softmax"])
    assert saved["identity_names"] == [f"id{i}" for i in range(6)]
    head = load_head(saved)
    best = torch.load(Path(trained["softmax"]).parents[1] / "c" / "best.pt", weights_only=False)
    assert torch.equal(head.weight.detach(), best["criterion"]["weight"]) and head.weight.shape == (6, 16)
    assert torch.equal(head.bias.detach(), saved["criterion"]["bias"])


def test_head_predictions_are_the_argmax_of_the_logits(trained):
    from pipeline.embed import head_predictions

    _, saved = load_model(trained["softmax"])
    head = load_head(saved)
    x = np.random.default_rng(0).normal(size=(10, 16)).astype(np.float32)
    logits = x @ saved["criterion"]["weight"].numpy().T + saved["criterion"]["bias"].numpy()  # by hand
    names = np.array(saved["identity_names"])
    np.testing.assert_array_equal(head_predictions(head, x, saved["identity_names"]), names[logits.argmax(1)])
    _, triplet = load_model(trained["triplet"])
    assert head_predictions(load_head(triplet), x, triplet["identity_names"]) is None


def test_head_sees_the_mean_of_the_image_and_its_mirror(tmp_path):
    """embed.flip sums the two embeddings; the head (trained on single embeddings) gets their mean.
    A bias makes the difference: per view e = (1, 0.5), logits with b = (0, 0.8): mean -> (1, 1.3),
    class b; the sum (2, 1) -> (2, 1.8) would give class a."""
    from types import SimpleNamespace

    from pipeline import losses
    from pipeline.embed import write_head_predictions

    head = losses.build("softmax", 2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
        head.bias.copy_(torch.tensor([0.0, 0.8]))
    data = SimpleNamespace(image_ids=["b/1"], identities=["b"])
    summed = np.array([[2.0, 1.0]], dtype=np.float32)
    assert write_head_predictions(tmp_path / "h.npz", head, {"identity_names": ["a", "b"]}, data, summed, flip=True)
    with np.load(tmp_path / "h.npz") as z:
        assert z["predicted"].tolist() == ["b"]
    write_head_predictions(tmp_path / "g.npz", head, {"identity_names": ["a", "b"]}, data, summed, flip=False)
    with np.load(tmp_path / "g.npz") as z:
        assert z["predicted"].tolist() == ["a"]  # the same vector as a single embedding


def test_closed_set_is_recognised_by_its_identities():
    from pipeline.embed import is_closed_set

    assert is_closed_set(["id1", "id1", "id4"], ["id0", "id1", "id4"])
    assert not is_closed_set(["id1", "new0"], ["id0", "id1"])
    assert not is_closed_set([], ["id0"])


@pytest.fixture(scope="module")
def embedded(trained, shards, tmp_path_factory) -> dict[str, Path]:
    from pipeline.embed import run_embed

    from pipeline.embed import run_embed_train

    root = tmp_path_factory.mktemp("embeddings")
    for loss, model in trained.items():
        for name in ("closed", "open"):
            run_embed(EmbedParams(flip=True), model, shards / name, root / loss / name, name=name)
        run_embed_train(EmbedParams(flip=True), model, shards / "train", {"train": {"val_fraction": 0.0},
                                                                          "data_seed": 0},
                        root / loss / "validation", root / loss / "train")
    return {loss: root / loss for loss in trained}


def test_embed_writes_head_predictions_for_the_closed_set_only(embedded, trained, shards):
    from pipeline.score import read_embeddings

    softmax = embedded["softmax"]
    assert (softmax / "closed" / "head.npz").is_file() and not (softmax / "open" / "head.npz").exists()
    assert not (embedded["triplet"] / "closed" / "head.npz").exists()  # no classifier
    with np.load(softmax / "closed" / "head.npz") as z:
        predicted = dict(zip(z["image_ids"], z["predicted"]))
    emb = read_embeddings(softmax / "closed" / "embeddings.npz")
    _, saved = load_model(trained["softmax"])
    w, b = saved["criterion"]["weight"].double().numpy(), saved["criterion"]["bias"].double().numpy()
    # the head on the mean of the image's and its mirror's embeddings (embed.flip sums them)
    by_hand = np.array(saved["identity_names"])[((emb["embeddings"] / 2.0) @ w.T + b).argmax(1)]
    assert [predicted[i] for i in emb["image_ids"]] == by_hand.tolist()


def test_score_reports_n_way_accuracy_of_the_closed_set(embedded, shards, tmp_path):
    from pipeline.score import ThresholdSource, read_embeddings, run_score

    params = ScoreParams(distances=["cosine"], normalize=[True], threshold={"min_pairs": 4})

    def score(loss: str, name: str) -> dict:
        folder = embedded[loss] / name
        return run_score(params, name, folder, ThresholdSource(name, folder, name), tmp_path / loss / name,
                         tmp_path / loss / f"{name}.json")

    closed = score("softmax", "closed")
    with np.load(embedded["softmax"] / "closed" / "head.npz") as z:
        predicted = dict(zip(z["image_ids"], z["predicted"]))
    emb = read_embeddings(embedded["softmax"] / "closed" / "embeddings.npz")
    expected = np.mean([predicted[i] == who for i, who in zip(emb["image_ids"], emb["identities"])])
    assert closed["n_way_accuracy"] == pytest.approx(expected) and closed["n_way_images"] == 18
    assert closed["n_way_accuracy"] > 1 / 6  # the head learnt something: better than chance
    assert "n_way_accuracy" not in score("softmax", "open")
    triplet = score("triplet", "closed")
    assert "n_way_accuracy" not in triplet and "rank1" in triplet


# ----------------------------------------------------------------------- angle distributions
def test_angles_by_hand_on_known_vectors():
    from pipeline.embed import angle_distributions

    deg = np.radians
    # two classes with centres at 0 and 90 degrees in the plane; images at known angles
    x = np.array([[np.cos(deg(10)), np.sin(deg(10))], [2 * np.cos(deg(-30)), 2 * np.sin(deg(-30))],
                  [np.cos(deg(80)), np.sin(deg(80))]])
    labels = np.array([0, 0, 1])
    out = angle_distributions(x, labels, centres=np.array([[3.0, 0.0], [0.0, 0.5]]))
    np.testing.assert_allclose(out["target"], [10, 30, 10], atol=1e-4)
    np.testing.assert_allclose(out["between_centres"], [90], atol=1e-4)
    np.testing.assert_allclose(out["nearest_centre"], [90, 90], atol=1e-4)
    assert str(out["centre"]) == "classifier weight"
    # without centres: the mean of the normalised embeddings (class 0: at -10 degrees)
    mean = angle_distributions(x, labels, centres=None)
    np.testing.assert_allclose(mean["target"], [20, 20, 0], atol=1e-4)
    np.testing.assert_allclose(mean["between_centres"], [90], atol=1e-4)
    assert str(mean["centre"]) == "mean embedding"


def test_embed_writes_the_training_angles(embedded, trained, shards):
    from pipeline.embed import angle_distributions
    from pipeline.shards import read_shards
    from pipeline.train import embed_array

    with np.load(embedded["softmax"] / "train" / "angles.npz") as z:
        angles = {k: z[k] for k in z.files}
    assert str(angles["centre"]) == "classifier weight" and str(angles["loss"]) == "softmax"
    assert angles["target"].shape == (48,) and angles["between_centres"].shape == (15,)
    model, saved = load_model(trained["softmax"])
    data = read_shards(shards / "train")
    emb = embed_array(model, torch.from_numpy(data.decode_all()), grayscale=False, device=torch.device("cpu"))
    expected = angle_distributions(emb, data.labels, saved["criterion"]["weight"].numpy())
    np.testing.assert_allclose(angles["target"], expected["target"], atol=1e-3)
    with np.load(embedded["triplet"] / "train" / "angles.npz") as z:
        assert str(z["centre"]) == "mean embedding"


def test_angles_of_a_large_training_set_use_a_seeded_sample(trained, shards, tmp_path, monkeypatch):
    from pipeline import embed

    monkeypatch.setattr(embed, "MAX_ANGLE_IMAGES", 20)
    from pipeline.shards import read_shards

    model, saved = load_model(trained["triplet"])
    for name in ("a", "b"):
        assert embed.write_training_angles(tmp_path / name / "angles.npz", model, saved, load_head(saved),
                                           read_shards(shards / "train"), torch.device("cpu"))
    with np.load(tmp_path / "a" / "angles.npz") as a, np.load(tmp_path / "b" / "angles.npz") as b:
        assert a["target"].shape == (20,) and np.array_equal(a["target"], b["target"])
        assert len(a["nearest_centre"]) <= 6  # mean embeddings: the classes the sample holds
