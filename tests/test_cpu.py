"""CPU settings that decide results: pinned instruction set, thread count, reproducible data."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import cpu
from pipeline.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
X86 = platform.machine().lower() in {"x86_64", "amd64"}
CPU_FLAGS = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
HAS_AVX2 = X86 and "avx2" in CPU_FLAGS


@pytest.mark.skipif(not X86, reason="pinning applies to x86-64 only")
def test_pin_sets_every_variable_but_keeps_the_users_own():
    env = {"ATEN_CPU_CAPABILITY": "default"}
    applied = cpu.pin_instruction_set(env)
    assert env["ATEN_CPU_CAPABILITY"] == "default" and "ATEN_CPU_CAPABILITY" not in applied
    for name, value in cpu.PINNED_ENVIRONMENT.items():
        if name != "ATEN_CPU_CAPABILITY":
            assert env[name] == value and applied[name] == value


def test_native_switch_leaves_the_kernels_alone_but_idle_threads_still_sleep():
    env = {"FACEPIPE_NATIVE_CPU": "1"}
    assert cpu.pin_instruction_set(env) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert env == {"FACEPIPE_NATIVE_CPU": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    mine = {"FACEPIPE_NATIVE_CPU": "1", "OMP_WAIT_POLICY": "ACTIVE"}
    assert cpu.pin_instruction_set(mine) == {} and mine["OMP_WAIT_POLICY"] == "ACTIVE"


def test_thread_count_default_and_override():
    assert cpu.thread_count({}) == cpu.available_cores() >= 1
    assert cpu.thread_count({"FACEPIPE_THREADS": " 3 "}) == 3
    for bad in ("0", "-2", "two", "1.5"):
        with pytest.raises(ConfigError, match=f"FACEPIPE_THREADS={bad!r}"):
            cpu.thread_count({"FACEPIPE_THREADS": bad})


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in cpu.PINNED_ENVIRONMENT and not k.startswith("FACEPIPE_")}
    env.update(PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3", **extra)
    return env


def test_bad_thread_count_stops_a_stage_with_one_line_and_status_2(tmp_path):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    result = subprocess.run([sys.executable, "-m", "pipeline", "data"], cwd=tmp_path, capture_output=True,
                            text=True, env=_clean_env(FACEPIPE_THREADS="lots"))
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "FACEPIPE_THREADS='lots'" in lines[0], result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


_REPORT_KERNELS = """
import pipeline.__main__  # what `python -m pipeline` runs first
import io, contextlib, json, numpy, cv2, torch
out = io.StringIO()
with contextlib.redirect_stdout(out):
    numpy.show_runtime()
print(json.dumps({"torch": torch.backends.cpu.get_cpu_capability(), "numpy": out.getvalue(),
                  "cv2": cv2.getCPUFeaturesLine()}))
"""


@pytest.mark.skipif(not HAS_AVX2, reason="needs an x86-64 CPU with AVX2")
@pytest.mark.parametrize("native", [False, True])
def test_a_pipeline_process_runs_avx2_kernels_unless_told_otherwise(native):
    env = _clean_env(**({"FACEPIPE_NATIVE_CPU": "1"} if native else {}))
    result = subprocess.run([sys.executable, "-c", _REPORT_KERNELS], capture_output=True, text=True, env=env,
                            check=True)
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    if not native:
        assert seen["torch"] == "AVX2"
        assert "'found': ['X86_V3']" in seen["numpy"]  # nothing above AVX2 dispatched
        assert "AVX512" not in seen["cv2"].replace("AVX512-SKX?", "")  # '?' = disabled
    elif "avx512f" in CPU_FLAGS:
        assert seen["torch"] == "AVX512"  # the switch really reaches the libraries


def _dvc_dir_md5(path: Path, work: Path) -> str:
    dvc = str(Path(sys.executable).with_name("dvc"))
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=work, check=True)
    subprocess.run([dvc, "add", "-q", str(path.relative_to(work))], cwd=work, check=True)
    return yaml.safe_load((work / f"{path.relative_to(work)}.dvc").read_text())["outs"][0]["md5"]


@pytest.mark.skipif(not HAS_AVX2, reason="the committed run was made with AVX2 kernels on x86-64")
def test_default_synthetic_data_matches_the_committed_lock_on_this_machine(tmp_path):
    """The committed dvc.lock records the default data's hash; regenerating it here must match.

    Fails when the synthetic generator (or a library under it) renders a single pixel
    differently from the machine that made the committed run, or when the generator was
    changed without rerunning `dvc repro` and committing dvc.lock.
    """
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    subprocess.run([sys.executable, "-m", "pipeline", "data", "synth_open", "--no-progress"], cwd=tmp_path,
                   check=True, capture_output=True, env=_clean_env())
    lock = yaml.safe_load((ROOT / "dvc.lock").read_text())
    want = next(o["md5"] for o in lock["stages"]["data@synth_open"]["outs"] if o["path"] == "data/datasets/synth_open")
    assert _dvc_dir_md5(tmp_path / "data" / "datasets" / "synth_open", tmp_path) == want
