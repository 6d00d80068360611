"""What pinning the CPU kernels to AVX2 costs (pipeline/cpu.py), against native kernels.

Each mode runs in its own fresh Python process, started the way a stage starts
(``import pipeline.__main__`` first, which pins unless ``FACEPIPE_NATIVE_CPU=1``), and
times three pieces of the default pipeline:

* render: synthetic faces at 160 px (numpy + OpenCV), single-threaded;
* detect: the batched PyTorch MTCNN on those faces;
* train: forward + backward + SGD steps of the default smallcnn (128-D head) at 112 px,
  batch 64, 1000 classes, on the stage's thread count.

It prints seconds per piece for both modes and the ratio pinned / native, plus a
digest of each piece's output: equal digests mean the two modes compute the same
bits on this CPU (on a CPU without AVX-512 they should).

    python bench/bench_cpu_isa.py
    python bench/bench_cpu_isa.py --faces 64 --steps 10 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_WORKER = r"""
import json, sys, time, hashlib
import pipeline.__main__  # pins the kernels unless FACEPIPE_NATIVE_CPU=1, as a stage does
import numpy as np, torch
from torch import nn
from pipeline import cpu
from pipeline.datasets import synthetic
from pipeline.models import build_model
from pipeline.mtcnn_torch import TorchMTCNN

faces, steps, repeats = (int(v) for v in sys.argv[1:4])
best = {}
digest = {}

def timed(name, fn):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter(); out = fn(); times.append(time.perf_counter() - t0)
    best[name] = min(times)
    digest[name] = hashlib.md5(out).hexdigest()[:12]

def render():
    imgs = []
    for i in range(faces):
        rng = np.random.default_rng(i)
        imgs.append(synthetic.render_face(synthetic.sample_identity(rng), synthetic.sample_variation(rng), 160))
    render.images = imgs
    return b"".join(im.tobytes() for im in imgs)

def detect():
    det = TorchMTCNN(num_threads=cpu.thread_count())
    out = det.detect(render.images)
    return json.dumps([[[round(float(v), 4) for v in d.box] for d in per] for per in out]).encode()

def train():
    torch.set_num_threads(cpu.thread_count()); torch.manual_seed(0)
    model = build_model("smallcnn", embedding_size=128)
    head = nn.Linear(128, 1000)
    opt = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(64, 3, 112, 112, generator=g) * 2 - 1
    y = torch.randint(0, 1000, (64,), generator=g)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(head(model(x)), y)
        opt.zero_grad(); loss.backward(); opt.step()
    return b"".join(p.detach().numpy().tobytes() for p in model.parameters())

timed("render", render)
timed("detect", detect)
timed("train", train)
print(json.dumps({"seconds": best, "digest": digest, "kernels": cpu.kernels(),
                  "torch_capability": torch.backends.cpu.get_cpu_capability(), "threads": cpu.thread_count()}))
"""


def run_mode(native: bool, faces: int, steps: int, repeats: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("FACEPIPE_NATIVE_CPU",)}
    env.update(PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    if native:
        env["FACEPIPE_NATIVE_CPU"] = "1"
    out = subprocess.run([sys.executable, "-c", _WORKER, str(faces), str(steps), str(repeats)], env=env,
                         capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"bench_cpu_isa: worker failed ({'native' if native else 'pinned'}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--faces", type=int, default=48, help="synthetic faces to render and detect")
    ap.add_argument("--steps", type=int, default=8, help="training steps per repeat")
    ap.add_argument("--repeats", type=int, default=3, help="best of this many repeats per piece")
    args = ap.parse_args()

    pinned = run_mode(False, args.faces, args.steps, args.repeats)
    native = run_mode(True, args.faces, args.steps, args.repeats)
    print(f"pinned: kernels={pinned['kernels']} torch={pinned['torch_capability']} threads={pinned['threads']}")
    print(f"native: kernels={native['kernels']} torch={native['torch_capability']} threads={native['threads']}")
    print(f"{'piece':<8} {'pinned s':>9} {'native s':>9} {'pinned/native':>14}  same bits")
    for piece in ("render", "detect", "train"):
        p, n = pinned["seconds"][piece], native["seconds"][piece]
        same = "yes" if pinned["digest"][piece] == native["digest"][piece] else "no"
        print(f"{piece:<8} {p:9.3f} {n:9.3f} {p / n:14.2f}  {same}")
    print(f"(render: {args.faces} faces at 160 px; detect: the same faces, batched MTCNN; "
          f"train: {args.steps} smallcnn steps, batch 64 at 112 px; best of {args.repeats})")


if __name__ == "__main__":
    main()
