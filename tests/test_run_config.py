"""scripts/run_config.py: what it rewrites in a params file and what it records."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("run_config", ROOT / "scripts" / "run_config.py")
run_config = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_config)


def test_dataset_paths_become_absolute_relative_to_the_repository():
    params = {
        "seeds": {"data": 0, "train": [0]},
        "data": {
            "train": {"kind": "folder", "path": "../shared/data/lfw-dev/images", "min_images_per_identity": 2},
            "tests": {
                "lfw": {"kind": "lfw", "path": "/abs/lfw", "pairs": "pairs.txt"},
                "web": {"kind": "pairs_csv", "path": "https://example.org/pairs.csv", "root": "imgs"},
            },
        },
    }
    params["pretrained"] = {"dlib": {"upsample": 1}, "other": {"kind": "facepipe", "path": "models/a.pt"}}
    out = run_config.absolute_data_paths(params)
    assert out["pretrained"]["other"]["path"] == str((ROOT / "models/a.pt").resolve())
    assert out["pretrained"]["dlib"] == {"upsample": 1}
    assert out["data"]["train"]["path"] == str((ROOT / "../shared/data/lfw-dev/images").resolve())
    assert out["data"]["tests"]["lfw"]["path"] == "/abs/lfw"
    assert out["data"]["tests"]["lfw"]["pairs"] == str(ROOT / "pairs.txt")
    assert out["data"]["tests"]["web"]["path"] == "https://example.org/pairs.csv"
    assert out["data"]["tests"]["web"]["root"] == str(ROOT / "imgs")
    assert out["data"]["train"]["min_images_per_identity"] == 2


def test_run_record_keeps_earlier_incremental_runs(tmp_path):
    first = {"repro_wall_s": 100.0, "forced": False, "stage_seconds": {"detect": 60.0, "train@arcface": 40.0}}
    record = run_config.run_record(tmp_path / "run.json", Path("configs/x.yaml"), first)
    (tmp_path / "run.json").write_text(json.dumps(record))
    second = {"repro_wall_s": 30.0, "forced": False, "stage_seconds": {"train@arcface": 30.0}}
    record = run_config.run_record(tmp_path / "run.json", Path("configs/x.yaml"), second)
    assert record["wall_s_all_runs"] == 130.0
    assert record["latest_stage_seconds"] == {"detect": 60.0, "train@arcface": 30.0}
    forced = {"repro_wall_s": 90.0, "forced": True, "stage_seconds": {"detect": 55.0}}
    record = run_config.run_record(tmp_path / "run.json", Path("configs/x.yaml"), forced)
    assert [r["repro_wall_s"] for r in record["runs"]] == [90.0]


def test_report_outputs_are_read_from_the_lock(tmp_path):
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  report:\n    cmd: x\n    outs:\n    - path: reports/index.md\n"
        "    - path: data/models/a\n  score@a:\n    cmd: y\n    outs:\n    - path: reports/roc/a\n"
    )
    assert run_config.report_outputs(tmp_path / "dvc.lock") == ["reports/index.md", "reports/roc/a"]


def test_the_run_gets_every_default_that_dvc_yaml_interpolates(tmp_path):
    """A params file may leave out score.threshold (configs/lfw-dev.yaml does); dvc.yaml reads
    ${score.threshold.source}, so the worktree's params.yaml must spell it out, and mean the same."""
    import yaml

    from pipeline.config import load_params

    tree = yaml.safe_load((ROOT / "params.yaml").read_text())
    del tree["score"]["threshold"]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tree))
    full = run_config.complete_params(path)
    assert full["score"]["threshold"]["source"] == "validation"
    for source in (path, ROOT / "configs" / "lfw-dev.yaml"):
        again = tmp_path / "again.yaml"
        again.write_text(yaml.safe_dump(run_config.complete_params(source)))
        # the same params, and still valid (no key written out that its entry may not have)
        assert load_params(again, check_paths=False) == load_params(source, check_paths=False)
