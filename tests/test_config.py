"""params.yaml validation: one clear line per mistake, exit status 2, nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, load_params

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = yaml.safe_load((ROOT / "params.yaml").read_text())


def _write(tmp_path: Path, edit) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    edit(params)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_default_params_are_valid():
    params = load_params(ROOT / "params.yaml")
    assert "arcface" in params.train_losses and "softmax" in params.train_losses
    assert params.loss_params("arcface")["margin"] == pytest.approx(0.5)
    # the committed recipes are the tuning grids' selections, unedited since
    tree = params.model_dump()
    assert set(params.tuning) == set(params.train_losses)
    assert all(params.tuning[loss].edited_keys(tree) == [] for loss in params.train_losses)


def _set(path: str, value):
    def edit(params):
        node = params
        keys = path.split(".")
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value

    return edit


BROKEN = [
    ("unknown top-level key", _set("trian", {"epochs": 3}), "trian"),
    ("typo in a section key", _set("train.epoch", 3), "train.epoch"),
    ("negative learning rate", _set("train.lr", -0.1), "train.lr"),
    ("zero embedding size", _set("model.embedding_size", 0), "model.embedding_size"),
    ("unknown backbone", _set("model.backbone", "resnet999"), "resnet999"),
    ("unknown loss", _set("train_losses", ["softmax", "arcfase"]), "arcfase"),
    ("loss listed twice", _set("train_losses", ["softmax", "softmax"]), "train_losses"),
    ("old top-level seed", _set("seed", 3), "seeds.data"),
    ("repeated training seed", _set("seeds.train", [1, 1]), "seeds.train"),
    ("no training seed", _set("seeds.train", []), "seeds.train"),
    ("recipe override of an unknown train key", _set("losses.triplet.train", {"batch_sise": 128}),
     "losses.triplet.train.batch_sise"),
    ("recipe override out of range", _set("losses.triplet.train", {"lr": -1}), "losses.triplet.train.lr"),
    ("arcface margin >= pi", _set("loss.margin", 3.5), "loss"),
    ("negative cosface margin", _set("losses.cosface.margin", -0.1), "margin"),
    ("zero scale", _set("loss.scale", 0), "scale"),
    ("unknown loss param", _set("losses.cosface.marign", 0.3), "marign"),
    ("missing dataset path", _set("data.train", {"kind": "folder", "path": "/no/such/folder"}), "/no/such/folder"),
    ("bad distance", _set("score.distances", ["cosine", "manhattan"]), "score.distances"),
    ("bad threshold", _set("detect.thresholds", [0.6, 0.7, 1.8]), "detect.thresholds"),
    ("unknown detect device", _set("detect.device", "gpu"), "detect.device"),
    ("threshold source not a test set", _set("score.threshold", {"source": "lfw"}), "score.threshold.source"),
    ("unknown threshold rule", _set("score.threshold", {"rule": "eer"}), "score.threshold.rule"),
    ("target FPR out of range", _set("score.threshold", {"target_fpr": 1.5}), "score.threshold.target_fpr"),
    ("threshold fallback not a test set", _set("score.threshold", {"fallback": "lfw"}), "score.threshold.fallback"),
    ("test set named validation", _set("data.tests.validation", {"kind": "synthetic", "set": "synth_open"}),
     "'validation'"),
    ("unknown pretrained kind", _set("pretrained", {"mine": {"kind": "onnx", "path": "m.pt"}}), "pretrained.mine.kind"),
    ("pretrained name that is no kind", _set("pretrained", {"mine": {"path": "m.pt"}}), "pretrained.mine"),
    ("facepipe entry without path", _set("pretrained", {"mine": {"kind": "facepipe"}}), "pretrained.mine.path"),
    ("facepipe entry with a dlib key", _set("pretrained", {"mine": {"kind": "facepipe", "path": "m.pt", "jitter": 2}}),
     "pretrained.mine.jitter"),
    ("dlib entry with a path", _set("pretrained", {"dlib": {"path": "m.pt"}}), "pretrained.dlib.path"),
    ("facepipe model file missing", _set("pretrained", {"mine": {"kind": "facepipe", "path": "/no/model.pt"}}),
     "/no/model.pt"),
    ("pretrained name of a trained run", _set("pretrained", {"arcface-0": {"kind": "dlib"}}), "arcface-0"),
    ("primary variant not scored", _set("score.distances", ["l2"]), "report.primary_distance"),
    ("old train.flip disagreeing with train.augment.flip", _set("train.flip", False), "train.augment.flip"),
    ("augmentation strength out of range", _set("train.augment.brightness", 1.5), "train.augment.brightness"),
    ("crop area range reversed", _set("train.augment.crop_area", [0.9, 0.5]), "train.augment.crop_area"),
    ("checkpoint choice on an unknown set", _set("train.select_on", "lfw"), "train.select_on = 'lfw'"),
    ("recipe checkpoint choice on an unknown set", _set("losses.triplet.train", {"select_on": "valid"}),
     "losses.triplet.train.select_on"),
    ("colour augmentation a grey model cannot see", lambda p: (_set("model.grayscale", True)(p),
                                                              _set("train.augment.grayscale", 0.2)(p)),
     "train.augment.grayscale"),
    ("softmax scale without training-time normalisation", _set("losses.softmax", {"scale": 20.0}), "normalize"),
]


@pytest.mark.parametrize("label,edit,needle", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_params_give_one_line(tmp_path, label, edit, needle):
    path = _write(tmp_path, edit)
    with pytest.raises(ConfigError) as err:
        load_params(path)
    message = str(err.value)
    assert "\n" not in message
    assert needle in message
    assert str(path) in message


def test_recipe_overrides_apply_to_their_loss_only(tmp_path):
    path = _write(tmp_path, _set("losses.triplet.train", {"batch_size": 128, "schedule": "constant"}))
    params = load_params(path)
    assert params.train_for("triplet").batch_size == 128 and params.train_for("triplet").schedule == "constant"
    assert params.train_for("softmax") == params.train
    assert "train" not in params.loss_params("triplet")  # the recipe is not a loss param


def test_old_train_flip_key_and_augment_and_select_on_overrides(tmp_path):
    def edit(params):
        params["train"].pop("augment")
        params["train"]["flip"] = False  # the key before train.augment existed
        params["train"]["select_on"] = "synth_closed"
        params["losses"]["triplet"] = {"train": {"augment": {"grayscale": 0.25}, "select_on": "validation"}}
        params["losses"]["center"]["train"] = {"flip": True}

    params = load_params(_write(tmp_path, edit))
    assert params.train.augment.flip is False and params.train.select_on == "synth_closed"
    triplet = params.train_for("triplet")
    assert triplet.augment.grayscale == 0.25 and triplet.augment.flip is False and triplet.select_on == "validation"
    assert params.train_for("center").augment.flip is True


def test_runs_are_losses_times_training_seeds(tmp_path):
    path = _write(tmp_path, _set("seeds.train", [3, 7]))
    params = load_params(path)
    assert params.runs["arcface"] == ["arcface-3", "arcface-7"]
    params.check_run("softmax-7")
    with pytest.raises(ConfigError, match=r"seed 2 is not in seeds.train"):
        params.check_run("softmax-2")


def test_older_dict_form_of_train_losses_still_reads(tmp_path):
    path = _write(tmp_path, _set("train_losses", {"softmax": "losses.softmax", "arcface": "loss"}))
    assert sorted(load_params(path).train_losses) == ["arcface", "softmax"]
    path = _write(tmp_path, _set("train_losses", {"arcface": "losses.arcface"}))
    with pytest.raises(ConfigError, match="the params section of arcface is 'loss'"):
        load_params(path)


def test_not_yaml(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("seed: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(path)


def test_cli_exits_2_and_writes_nothing(tmp_path):
    path = _write(tmp_path, _set("train.lr", -1))
    before = sorted(p.name for p in tmp_path.iterdir())
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "data", "--params", str(path)],
        cwd=tmp_path, capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "train.lr" in lines[0] and "-1" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_synthetic_sizes_that_cannot_make_the_pairs_stop_in_one_line(tmp_path):
    path = _write(tmp_path, _set("data.synthetic", {"train_identities": 6, "closed_images_per_identity": 2,
                                                    "folds": 2, "pairs_per_fold": 8}))
    result = subprocess.run([sys.executable, "-m", "pipeline", "data", "--params", str(path), "--no-progress"],
                            cwd=tmp_path, capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert "data.synthetic" in lines[0] and "pairs_per_fold" in lines[0]
    assert not (tmp_path / "data" / "datasets" / "train").exists()


def test_pretrained_kind_defaults_to_the_name(tmp_path):
    path = _write(tmp_path, _set("pretrained", {"dlib": {"upsample": 1, "jitter": 0}}))
    params = load_params(path)
    assert params.pretrained_kind("dlib") == "dlib" and params.runs["dlib"] == ["dlib"]
    model = tmp_path / "model.pt"
    model.write_bytes(b"weights")
    path = _write(tmp_path, _set("pretrained", {"other_lab": {"kind": "facepipe", "path": str(model)},
                                                "hog": {"kind": "dlib", "jitter": 2}}))
    params = load_params(path)
    assert params.pretrained_kind("other_lab") == "facepipe" and params.pretrained_kind("hog") == "dlib"
    assert set(params.models[-2:]) == {"other_lab", "hog"}


def test_unlabelled_set_cannot_be_a_threshold_source_or_report_set(tmp_path):
    from tests.conftest import write_image

    import numpy as np

    write_image(tmp_path / "web" / "a.jpg", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "web" / "pairs.csv").write_text("path1,path2\na.jpg,a.jpg\n")
    web = {"kind": "pairs_csv", "path": str(tmp_path / "web" / "pairs.csv")}

    def edit(key, value):
        def apply(params):
            params["data"]["tests"]["web"] = web
            _set(key, value)(params)
        return apply

    load_params(_write(tmp_path, edit("score.threshold", {"source": "validation"})))  # listed, not used: fine
    for key, value in [("score.threshold.source", "web"), ("score.threshold.fallback", "web"),
                       ("report.in_domain", "web"), ("report.cross_domain", ["web"])]:
        path = _write(tmp_path, edit(key, value) if key.startswith("report") else
                      edit("score.threshold", {key.rsplit(".", 1)[1]: value}))
        with pytest.raises(ConfigError) as err:
            load_params(path)
        assert "\n" not in str(err.value) and key in str(err.value) and "no labels" in str(err.value)


def test_the_cli_runs_from_any_folder_inside_the_project(tmp_path):
    """Started in a sub-folder, `python -m pipeline` moves to the project root (where dvc.yaml and
    params.yaml are) after making the file arguments absolute."""
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    (tmp_path / "configs" / "deep").mkdir(parents=True)
    other = tmp_path / "configs" / "other.yaml"
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    _set("train_losses", ["softmax"])(raw)
    other.write_text(yaml.safe_dump(raw))
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    here = tmp_path / "configs" / "deep"
    result = subprocess.run([sys.executable, "-m", "pipeline", "validate"], cwd=here, capture_output=True,
                            text=True, env=env)
    assert result.returncode == 0 and "params.yaml: ok (6 losses" in result.stdout, result.stderr
    result = subprocess.run([sys.executable, "-m", "pipeline", "validate", "-p", "../other.yaml"], cwd=here,
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0 and "other.yaml: ok (1 losses: softmax)" in result.stdout, result.stderr


def test_per_set_detect_overrides_and_pretrained_threshold_sources(tmp_path):
    params = load_params(_write(tmp_path, _set("data.tests.synth_domain.detect", {"min_confidence": 0.95})))
    assert params.detect_for("synth_domain").min_confidence == 0.95
    assert params.detect_for("synth_open") == params.detect and params.detect_for("train") == params.detect
    for key, value, needle in [
        ("data.tests.synth_domain.detect", {"min_confidense": 0.9}, "detect.min_confidense: unknown detect key"),
        ("data.tests.synth_domain.detect", {"min_confidence": 1.5}, "min_confidence"),
        ("pretrained", {"dlib": {"threshold_source": "nowhere"}}, "pretrained.dlib.threshold_source = 'nowhere'"),
    ]:
        with pytest.raises(ConfigError) as err:
            load_params(_write(tmp_path, _set(key, value)))
        assert needle in str(err.value) and "\n" not in str(err.value)

    def no_in_domain(raw):
        raw["report"]["in_domain"] = None
        raw["report"]["cross_domain"] = []
        raw["pretrained"] = {"dlib": {}}

    with pytest.raises(ConfigError, match="pretrained.dlib.threshold_source: required when report.in_domain is not"):
        load_params(_write(tmp_path, no_in_domain))


def test_keys_the_dvc_stages_track_must_be_in_the_params_file(tmp_path):
    """DVC stops with "Parameters ... are missing" for a tracked key the file leaves out: validate says
    which, in one line, first."""
    def without_synthetic(raw):
        del raw["data"]["synthetic"]

    with pytest.raises(ConfigError, match="data.synthetic: missing; each data stage tracks it as a DVC param"):
        load_params(_write(tmp_path, without_synthetic))

    def benchmarks_without_protocol(raw):
        raw["benchmarks"] = {"ijb": {"kind": "ijb", "path": str(tmp_path)}}
        del raw["protocol"]

    with pytest.raises(ConfigError, match="protocol.flip: missing; each bench_embed stage tracks it"):
        load_params(_write(tmp_path, benchmarks_without_protocol))
