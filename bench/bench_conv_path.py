"""Which convolution kernels training runs on, and what avoiding oneDNN would cost.

Training on two x86-64 hosts (Intel Xeon, AMD EPYC) with the kernels pinned to AVX2 and
the same thread count reproduced the data, detection, alignment and shards bit for bit,
but not training. The prime suspect is oneDNN: PyTorch's CPU convolutions are oneDNN
JIT kernels whose blocking (how the loops over channels and pixels are tiled, hence the
order of the floating-point sums) is chosen from the host's cache sizes, which differ
between CPU models. The alternative path, ``torch.backends.mkldnn.enabled = False``,
runs convolutions as im2col + MKL GEMM, which MKL_CBWR=AVX2 (set by pipeline/cpu.py)
makes reproducible across processors for a fixed thread count.

This script, in fresh pinned processes (as a stage starts):

1. lists the oneDNN primitives a training step uses (``ONEDNN_VERBOSE``), i.e. which
   implementation this host picked (``brg_conv``, ``jit:avx2``, ...);
2. times forward + backward + SGD steps of the default smallcnn at 64 and 112 px with
   oneDNN on and off, and prints the ratio;
3. prints a digest of the weights after the steps for each path (the two paths give
   different bits; each is deterministic on one host).

It cannot show cross-vendor equality on one machine; it measures what the candidate fix costs.

    python bench/bench_conv_path.py [--steps 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_WORKER = r"""
import sys, time, hashlib
import pipeline.__main__  # pins the kernels, as a stage does
import torch
from pipeline import cpu, losses
from pipeline.models import build_model

size, steps, repeats, onednn = (int(v) for v in sys.argv[1:5])
torch.backends.mkldnn.enabled = bool(onednn)
torch.set_num_threads(cpu.thread_count())
best = None
for _ in range(repeats):
    torch.manual_seed(0)
    model = build_model("smallcnn", embedding_size=128, input_size=size)
    crit = losses.build("arcface", num_classes=80, embedding_size=128)
    opt = torch.optim.SGD(list(model.parameters()) + list(crit.parameters()), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 3, size, size, generator=g)
    y = torch.randint(0, 80, (64,), generator=g)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = crit(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    elapsed = time.perf_counter() - t0
    best = elapsed if best is None else min(best, elapsed)
digest = hashlib.md5(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()[:12]
print(f"{best / steps / 64 * 1000:.3f} {digest}")
"""


def worker(size: int, steps: int, repeats: int, onednn: bool, verbose: bool = False) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if verbose:
        env["ONEDNN_VERBOSE"] = "1"
    result = subprocess.run([sys.executable, "-c", _WORKER, str(size), str(steps), str(repeats), str(int(onednn))],
                            cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return result.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from pipeline import cpu

    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), os.uname().machine) if Path("/proc/cpuinfo").exists() else "?"
    print(f"host: {model}, threads {cpu.thread_count()}")
    verbose = worker(64, 1, 1, True, verbose=True)  # the verbose lines go to stdout before the timing line
    # onednn_verbose,v1,primitive,exec,cpu,<kind>,<implementation>,<propagation>,...
    kernels = sorted({f"{f[5]} {f[6]} {f[7]}" for f in (line.split(",") for line in verbose.splitlines())
                      if len(f) > 7 and f[0] == "onednn_verbose" and f[3] == "exec"})
    print("oneDNN primitives in one training step (kind, implementation, propagation):")
    for k in kernels:
        print(f"  {k}")
    print(f"\n{'size':>5} {'oneDNN conv ms/img':>20} {'im2col+MKL ms/img':>20} {'ratio':>7}   digests (on / off)")
    for size in (64, 112):
        on_ms, on_digest = worker(size, args.steps, args.repeats, True).split()
        off_ms, off_digest = worker(size, args.steps, args.repeats, False).split()
        print(f"{size:>5} {float(on_ms):>20.3f} {float(off_ms):>20.3f} {float(off_ms) / float(on_ms):>7.2f}   "
              f"{on_digest} / {off_digest}")


if __name__ == "__main__":
    main()
