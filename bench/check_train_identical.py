"""Whether a change to the trainer keeps its results bit for bit: short real runs, dumped and compared.

``dump OUT`` trains a few small runs on the tests' tiny shards (``tests/test_train.py``'s
``_shards``; 6 identities x 8 images at 112 px) and writes, per run, every tensor and value
of ``model.pt``, ``best.pt`` and ``last.pt`` (model, loss, optimiser, scaler, schedule state),
``history.csv`` and ``metrics.json`` into ``OUT/RUN.pt``. Runs: ArcFace flip-only; ArcFace
with every augmentation; ArcFace decoding per batch on 2 threads; triplet (P x K batches);
SphereFace; center loss; ArcFace stopped in epoch 2 and resumed; ArcFace on 2 processes
(torchrun, gloo) through the CLI.

``compare A B`` compares two dumps: every tensor with ``torch.equal``, everything else with
``==``, except the checkpoint's ``fingerprint`` (it hashes the trainer's source, so it must
change with the code). Exit status 1 when anything differs.

    FACEPIPE_THREADS=1 python bench/check_train_identical.py dump /tmp/before
    (change the trainer)
    FACEPIPE_THREADS=1 python bench/check_train_identical.py dump /tmp/after
    python bench/check_train_identical.py compare /tmp/before /tmp/after
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RUNS = {
    "arcface": dict(loss="arcface"),
    "arcface-augmented": dict(loss="arcface", epochs=2, augment={"crop_area": [0.7, 1.0], "brightness": 0.3,
                                                                "grayscale": 0.3, "flip": True}),
    "arcface-per-batch": dict(loss="arcface", decode="per_batch", workers=2),
    "triplet": dict(loss="triplet", epochs=2, pk_identities=4, pk_images=2),
    "sphereface": dict(loss="sphereface", epochs=2),
    "center": dict(loss="center", epochs=2),
}


def _outputs(out: Path) -> dict:
    """Everything a run wrote that must not change: the three checkpoint files, history, metrics."""
    found = {name: torch.load(out / sub / name, map_location="cpu", weights_only=False)
             for sub, name in (("model", "model.pt"), ("ckpt", "best.pt"), ("ckpt", "last.pt"))}
    found["last.pt"].pop("fingerprint", None)
    found["history.csv"] = pd.read_csv(out / "report" / "history.csv").to_dict("list")
    found["metrics.json"] = json.loads((out / "report" / "metrics.json").read_text())
    return found


def _train(shards: Path, out: Path, loss: str, **train) -> None:
    from pipeline import train as train_module
    from tests.test_train import _setup

    train_module.train(_setup(loss, **train), shards, out / "model", out / "ckpt", out / "report", progress=False)


def _resumed(shards: Path, out: Path) -> None:
    """ArcFace, 3 epochs, stopped in epoch 2's validation (after epoch 1's checkpoint), then rerun."""
    from pipeline import train as train_module

    real, calls = train_module.validation_auc, {"n": 0}

    def crash_in_epoch_2(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("stop before the epoch-2 checkpoint")
        return real(*args, **kwargs)

    train_module.validation_auc = crash_in_epoch_2
    try:
        _train(shards, out, "arcface")
    except KeyboardInterrupt:
        pass
    finally:
        train_module.validation_auc = real
    _train(shards, out, "arcface")


def _two_processes(root: Path) -> Path:
    """The CLI with FACEPIPE_NPROC=2 (torchrun, DDP over gloo) in a project like the tests' ones."""
    from tests.test_train import _project

    project = _project(root, 3)
    env = dict(os.environ, PYTHONPATH=str(ROOT), FACEPIPE_NPROC="2", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "pipeline", "train", "arcface", "--seed", "0", "--no-progress"],
                          cwd=project, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode:
        raise SystemExit(f"2-process run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    out = root / "two"
    for sub, source in (("model", "data/models/arcface-0"), ("ckpt", "data/checkpoints/arcface-0"),
                        ("report", "reports/train/arcface-0")):
        (out / sub).parent.mkdir(parents=True, exist_ok=True)
        (project / source).rename(out / sub)
    return out


def dump(target: Path) -> None:
    from tests.test_train import _shards

    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards = _shards(root)
        for name, spec in RUNS.items():
            spec = dict(spec)
            _train(shards, root / name, spec.pop("loss"), **spec)
            torch.save(_outputs(root / name), target / f"{name}.pt")
            print(f"{name}: dumped", flush=True)
        _resumed(shards, root / "resumed")
        torch.save(_outputs(root / "resumed"), target / "arcface-resumed.pt")
        print("arcface-resumed: dumped", flush=True)
        torch.save(_outputs(_two_processes(root)), target / "arcface-2-processes.pt")
        print("arcface-2-processes: dumped", flush=True)


def _differences(a, b, where: str) -> list[str]:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
        return [] if same else [f"{where}: tensors differ"]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{where}: keys {sorted(map(str, set(a) ^ set(b)))} in only one"]
        return [d for k in a for d in _differences(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: {len(a)} vs {len(b)} items"]
        return [d for k, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{where}[{k}]")]
    same = a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)  # NaN == NaN here
    return [] if same else [f"{where}: {a!r} vs {b!r}"]


def compare(first: Path, second: Path) -> int:
    names = sorted(p.name for p in first.glob("*.pt"))
    if names != sorted(p.name for p in second.glob("*.pt")):
        print(f"different runs: {names} vs {sorted(p.name for p in second.glob('*.pt'))}")
        return 1
    failed = 0
    for name in names:
        a = torch.load(first / name, weights_only=False)
        b = torch.load(second / name, weights_only=False)
        found = _differences(a, b, name.removesuffix(".pt"))
        tensors = sum(isinstance(v, torch.Tensor) for v in _leaves(a))
        print(f"{name.removesuffix('.pt')}: {'identical' if not found else 'DIFFERENT'} "
              f"({tensors} tensors, {len(_leaves(a)) - tensors} other values)")
        for line in found[:20]:
            print("  ", line)
        failed += bool(found)
    return 1 if failed else 0


def _leaves(tree) -> list:
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in _leaves(v)]
    if isinstance(tree, (list, tuple)):
        return [x for v in tree for x in _leaves(v)]
    return [tree]


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "dump":
        dump(Path(sys.argv[2]))
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        raise SystemExit(compare(Path(sys.argv[2]), Path(sys.argv[3])))
    else:
        raise SystemExit(__doc__)
